import Foundation
import Observation

/// What the chat screen shows and the buttons it offers, without SwiftUI: loading a model folder,
/// sending a message and streaming the reply into the transcript, Stop, New chat. The model work runs
/// in the `ChatSession` actor; this object lives on the main actor and only receives its updates.
@MainActor
@Observable
public final class ChatViewModel {
    public enum Phase: Equatable, Sendable {
        case noModel
        case loading(String)
        case ready
        case generating
        case failed(String)
    }

    /// Opens an artifact folder as a session (the app's loads the Core ML package and the tokenizer).
    public typealias Loader = @Sendable (URL) async throws -> ChatSession

    public private(set) var phase: Phase = .noModel
    public private(set) var messages: [ChatMessage] = []
    public private(set) var status: StreamStatus?
    public private(set) var modelName = ""
    public var settings = SamplingSettings(temperature: 0.7, topK: 40, topP: 0.95, seed: nil, maxTokens: 512)

    /// Where the conversation is kept across launches (the app: Application Support). Saved by `saveSession()`
    /// when the app goes to the background, resumed when the same model loads; otherwise a chat starts from the
    /// artifact's pinned system prompt (`prefix.safetensors`) when it has one.
    @ObservationIgnored public var sessionFile: URL?
    @ObservationIgnored private var folder: URL?
    @ObservationIgnored private let loader: Loader
    @ObservationIgnored private var session: ChatSession?
    @ObservationIgnored private var loading: Task<Void, Never>?
    @ObservationIgnored private var generation: Task<Void, Never>?
    @ObservationIgnored private var nextID = 0

    public init(loader: @escaping Loader) {
        self.loader = loader
    }

    /// A model folder bundled with the app (its resources hold `edgekv.json`) is loaded at launch.
    @discardableResult
    public func loadBundledModel(from resources: URL? = Bundle.main.resourceURL) -> Task<Void, Never>? {
        guard phase == .noModel, let resources,
              FileManager.default.fileExists(atPath: resources.appendingPathComponent(Manifest.fileName).path)
        else { return nil }
        return load(folder: resources)
    }

    /// Replaces the model with the one in `url` (an `edgekv export --target coreml` folder).
    @discardableResult
    public func load(folder url: URL) -> Task<Void, Never> {
        stopGenerating()
        loading?.cancel()
        session = nil  // two models need not be in memory at once
        phase = .loading("Loading \(url.lastPathComponent)… (the first load of a package compiles it)")
        let loader = self.loader
        let task = Task {
            do {
                let session = try await loader(url)
                guard !Task.isCancelled else { return }  // another folder was chosen meanwhile
                try await Self.start(session, folder: url, saved: sessionFile)
                self.session = session
                folder = url
                modelName = session.manifest.title
                messages = await session.messages.filter { $0.role != .system }
                nextID = (messages.map(\.id).max() ?? -1) + 1
                status = await session.status()
                phase = .ready
            } catch {
                guard !Task.isCancelled else { return }
                phase = .failed(error.localizedDescription)
            }
        }
        loading = task
        return task
    }

    /// Resumes the saved conversation if it belongs to this model (another model's is refused and ignored),
    /// else starts from the pinned system prompt if the artifact has one.
    private static func start(_ session: ChatSession, folder: URL, saved: URL?) async throws {
        if let saved, let data = try? Data(contentsOf: saved), (try? await session.restore(data)) != nil {
            return
        }
        if let prefix = session.manifest.prefix {
            try await session.restore(Data(contentsOf: folder.appendingPathComponent(prefix.file)))
        }
    }

    /// Writes the conversation to `sessionFile` (atomically), unless a reply is being generated.
    @discardableResult
    public func saveSession() -> Task<Void, Never>? {
        guard let session, let sessionFile, phase == .ready else { return nil }
        return Task {
            do {
                try await session.sessionData().write(to: sessionFile, options: .atomic)
            } catch {
                phase = .failed("could not save the conversation: \(error.localizedDescription)")
            }
        }
    }

    /// Adds the user's message and streams the reply into the message after it.
    @discardableResult
    public func send(_ text: String) -> Task<Void, Never>? {
        let user = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let session, phase == .ready, !user.isEmpty else { return nil }
        messages.append(ChatMessage(id: takeID(), role: .user, content: user))
        let replyID = takeID()
        messages.append(ChatMessage(id: replyID, role: .assistant, content: ""))
        phase = .generating
        let updates = session.reply(to: user, settings: settings)
        let task = Task {
            do {
                for try await update in updates {
                    append(update.piece, to: replyID)
                    status = update.status
                }
                if phase == .generating { phase = .ready }
            } catch {
                // Unless the screen has moved on (another model, a new chat) meanwhile.
                if phase == .generating { phase = .failed(error.localizedDescription) }
            }
        }
        generation = task
        return task
    }

    /// Ends the current reply; what was generated stays in the conversation.
    public func stopGenerating() {
        generation?.cancel()
        generation = nil
    }

    /// Starts over at position 0 with a fresh cache, once a stopped reply has let go of it.
    @discardableResult
    public func newChat() -> Task<Void, Never>? {
        stopGenerating()
        guard let session else { return nil }
        messages = []
        phase = .loading("New chat")
        let folder = self.folder
        let task = Task {
            do {
                try await session.newChat()
                if let folder {  // a pinned system prompt starts every chat
                    try await Self.start(session, folder: folder, saved: nil)
                }
                status = await session.status()
                phase = .ready
            } catch {
                phase = .failed(error.localizedDescription)
            }
        }
        return task
    }

    private func append(_ piece: String, to id: Int) {
        if let index = messages.lastIndex(where: { $0.id == id }) {
            messages[index].content += piece
        }
    }

    private func takeID() -> Int {
        nextID += 1
        return nextID
    }
}
