import EdgeKVCore
import EdgeKVRuntime
import SwiftUI
import UniformTypeIdentifiers

struct ChatView: View {
    @State private var model = ChatViewModel { try await ChatSession.load(folder: $0) }
    @State private var draft = ""
    @State private var importing = false
    @State private var showingSettings = false
    @State private var pickedFolder: URL?  // a Files-app folder stays readable while the app uses it
    @Environment(\.scenePhase) private var scenePhase

    /// The conversation kept across launches: saved when the app leaves the foreground, resumed at launch.
    private static var sessionFile: URL? {
        guard let support = FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask).first
        else { return nil }
        try? FileManager.default.createDirectory(at: support, withIntermediateDirectories: true)
        return support.appendingPathComponent("conversation.safetensors")
    }

    var body: some View {
        NavigationStack {
            VStack(spacing: 0) {
                transcript
                Divider()
                if let status = model.status {
                    Text(status.text)
                        .font(.caption.monospacedDigit())
                        .foregroundStyle(.secondary)
                        .padding(.vertical, 4)
                }
                composer
            }
            .navigationTitle(model.modelName.isEmpty ? "edgekv" : model.modelName)
            .toolbar {
                ToolbarItemGroup {
                    Button("Open model", systemImage: "folder") { importing = true }
                    Button("Settings", systemImage: "slider.horizontal.3") { showingSettings = true }
                    Button("New chat", systemImage: "square.and.pencil") { model.newChat() }
                        .disabled(model.phase == .noModel)
                }
            }
            .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
                if case .success(let url) = result {
                    open(picked: url)
                }
            }
            .sheet(isPresented: $showingSettings) {
                SettingsView(settings: $model.settings)
            }
            .task {
                model.sessionFile = Self.sessionFile
                model.loadBundledModel()
            }
            .onChange(of: scenePhase) { _, phase in
                if phase != .active { model.saveSession() }  // the system may end a backgrounded app at any time
            }
        }
    }

    private var transcript: some View {
        ScrollViewReader { proxy in
            ScrollView {
                LazyVStack(alignment: .leading, spacing: 12) {
                    phaseNote
                    ForEach(model.messages) { message in
                        MessageRow(message: message).id(message.id)
                    }
                }
                .padding()
            }
            .onChange(of: model.messages) {
                if let last = model.messages.last {
                    proxy.scrollTo(last.id, anchor: .bottom)
                }
            }
        }
    }

    @ViewBuilder private var phaseNote: some View {
        switch model.phase {
        case .noModel:
            Text("Open the folder `edgekv export --target coreml` wrote (Files app), or bundle one in Model/.")
                .foregroundStyle(.secondary)
        case .loading(let what):
            ProgressView(what)
        case .failed(let message):
            Text(message).foregroundStyle(.red)
        case .ready, .generating:
            EmptyView()
        }
    }

    private var composer: some View {
        HStack {
            TextField("Message", text: $draft, axis: .vertical)
                .textFieldStyle(.roundedBorder)
                .onSubmit(send)
            if model.phase == .generating {
                Button("Stop", systemImage: "stop.circle.fill") { model.stopGenerating() }
            } else {
                Button("Send", systemImage: "arrow.up.circle.fill", action: send)
                    .disabled(model.phase != .ready || draft.isEmpty)
            }
        }
        .labelStyle(.iconOnly)
        .font(.title2)
        .padding()
    }

    private func send() {
        model.send(draft)
        draft = ""
    }

    private func open(picked url: URL) {
        pickedFolder?.stopAccessingSecurityScopedResource()
        pickedFolder = url.startAccessingSecurityScopedResource() ? url : nil
        model.load(folder: url)
    }
}

struct MessageRow: View {
    let message: ChatMessage

    var body: some View {
        HStack {
            if message.role == .user { Spacer(minLength: 40) }
            Text(message.content.isEmpty ? "…" : message.content)
                .textSelection(.enabled)
                .padding(10)
                .background(message.role == .user ? Color.accentColor.opacity(0.15) : Color.secondary.opacity(0.1),
                            in: RoundedRectangle(cornerRadius: 12))
            if message.role != .user { Spacer(minLength: 40) }
        }
    }
}

struct SettingsView: View {
    @Binding var settings: SamplingSettings
    @Environment(\.dismiss) private var dismiss

    var body: some View {
        NavigationStack {
            Form {
                Section("Sampling") {
                    LabeledContent("Temperature \(settings.temperature, specifier: "%.2f")") {
                        Slider(value: $settings.temperature, in: 0...2)
                    }
                    Stepper("Top-k \(settings.topK == 0 ? "off" : String(settings.topK))", value: $settings.topK, in: 0...200)
                    LabeledContent("Top-p \(settings.topP, specifier: "%.2f")") {
                        Slider(value: $settings.topP, in: 0.05...1)
                    }
                    Stepper("Max tokens per reply \(settings.maxTokens == 0 ? "∞" : String(settings.maxTokens))",
                            value: $settings.maxTokens, in: 0...8192, step: 64)
                }
                Section {
                    Text("Temperature 0 is greedy. The cache never grows: a reply may run past the ring as often "
                        + "as it likes, and the conversation goes on in the same fixed memory.")
                        .font(.footnote)
                        .foregroundStyle(.secondary)
                }
            }
            .navigationTitle("Settings")
            .toolbar { Button("Done") { dismiss() } }
        }
    }
}
