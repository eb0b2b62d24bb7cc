import EdgeKVCore
import EdgeKVRuntime
import Foundation
import Observation

@MainActor
@Observable
final class ChatViewModel {
    enum Phase: Equatable {
        case noModel
        case loading(String)
        case ready
        case generating
        case failed(String)
    }

    var phase: Phase = .noModel
    var messages: [ChatMessage] = []
    var status: StreamStatus?
    var settings = SamplingSettings(temperature: 0.7, topK: 40, topP: 0.95, seed: nil, maxTokens: 512)
    var modelName = ""

    private var engine: ChatEngine?
    private var generation: Task<Void, Never>?
    private var scopedURL: URL?
    private var nextID = 0

    /// A model folder bundled with the app (apps/ios-demo/Model, see README) is loaded at launch.
    func loadBundledModel() {
        guard engine == nil, let resources = Bundle.main.resourceURL,
              FileManager.default.fileExists(atPath: resources.appendingPathComponent(Manifest.fileName).path)
        else { return }
        load(folder: resources, securityScoped: false)
    }

    /// A folder picked in the Files app (an `edgekv export --target coreml` output).
    func load(folder url: URL, securityScoped: Bool) {
        stopGenerating()
        if securityScoped {
            scopedURL?.stopAccessingSecurityScopedResource()
            scopedURL = url.startAccessingSecurityScopedResource() ? url : nil
        }
        phase = .loading("Loading \(url.lastPathComponent)… (the first load of a package compiles it)")
        Task {
            do {
                let engine = try await ChatEngine.load(folder: url)
                self.engine = engine
                self.modelName = "\(engine.folder.manifest.architecture.modelType) · S=\(engine.folder.manifest.sink) "
                    + "W=\(engine.folder.manifest.window)"
                self.messages = []
                self.status = StreamStatus(tokensPerSecond: 0, position: 0, capacity: engine.capacity,
                                           footprintBytes: memoryFootprintBytes())
                self.phase = .ready
            } catch {
                self.phase = .failed(error.localizedDescription)
            }
        }
    }

    func send(_ text: String) {
        let user = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let engine, phase == .ready, !user.isEmpty else { return }
        messages.append(ChatMessage(id: takeID(), role: .user, content: user))
        let replyID = takeID()
        messages.append(ChatMessage(id: replyID, role: .assistant, content: ""))
        phase = .generating
        let settings = self.settings
        generation = Task.detached(priority: .userInitiated) { [weak self] in
            do {
                try engine.reply(to: user, settings: settings) { piece, status in
                    DispatchQueue.main.async {
                        MainActor.assumeIsolated { self?.append(piece, to: replyID, status: status) }
                    }
                }
                await MainActor.run { self?.phase = .ready }
            } catch {
                await MainActor.run { self?.phase = .failed(error.localizedDescription) }
            }
        }
    }

    func stopGenerating() {
        generation?.cancel()
        generation = nil
    }

    func newChat() {
        stopGenerating()
        guard let engine else { return }
        do {
            try engine.newChat()
            messages = []
            status = StreamStatus(tokensPerSecond: 0, position: 0, capacity: engine.capacity,
                                  footprintBytes: memoryFootprintBytes())
            phase = .ready
        } catch {
            phase = .failed(error.localizedDescription)
        }
    }

    private func append(_ piece: String, to id: Int, status: StreamStatus) {
        if let index = messages.lastIndex(where: { $0.id == id }) {
            messages[index].content += piece
        }
        self.status = status
    }

    private func takeID() -> Int {
        nextID += 1
        return nextID
    }
}
