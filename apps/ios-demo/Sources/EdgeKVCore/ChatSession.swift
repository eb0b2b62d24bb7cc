import Foundation

/// Text to token ids and back, as the model's tokenizer does it (swift-transformers in the app).
public protocol ChatTokenizer: TokenDecoding {
    /// Ids of `text` as the chat template wrote it: no special tokens added.
    func encode(_ text: String) -> [Int]
}

/// One piece of a streaming reply and the status line once it was generated.
public struct ReplyUpdate: Equatable, Sendable {
    public let piece: String
    public let status: StreamStatus

    public init(piece: String, status: StreamStatus) {
        self.piece = piece
        self.status = status
    }
}

/// One conversation as one continuous stream through a model's fixed cache.
///
/// An actor: the model, its cache state, the tokenizer and the transcript are used by one reply at a
/// time whichever task asks, and a new chat waits for a stopped reply to let go of the cache. Replies
/// come out as an `AsyncThrowingStream`; cancelling its consumer stops the generation.
public actor ChatSession {
    public nonisolated let manifest: Manifest
    private let stream: TokenStream
    private let tokenizer: any ChatTokenizer
    private let renderer: any ChatRendering
    private let footprint: @Sendable () -> UInt64?
    private let now: @Sendable () -> Double
    private var transcript = ChatTranscript()

    /// `footprint` gives the memory the status line shows; `now` is a clock in seconds (monotonic).
    public init(manifest: Manifest, model: any LogitsModel, tokenizer: any ChatTokenizer, renderer: any ChatRendering,
                footprint: @escaping @Sendable () -> UInt64? = { nil },
                now: @escaping @Sendable () -> Double = { ProcessInfo.processInfo.systemUptime }) {
        self.manifest = manifest
        stream = TokenStream(model: model, geometry: manifest.geometry)
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.footprint = footprint
        self.now = now
    }

    /// Tokens in the stream since the chat began, all turns included.
    public var position: Int { stream.position }

    /// The rendered conversation the stream holds (what the next turn continues from).
    public var inStream: String { transcript.inStream }

    /// The status line between replies.
    public func status() -> StreamStatus {
        StreamStatus(tokensPerSecond: 0, position: stream.position, capacity: manifest.geometry.capacity,
                     footprintBytes: footprint())
    }

    /// Starts over at position 0 with a fresh cache and an empty conversation.
    public func newChat() throws {
        try stream.reset()
        transcript = ChatTranscript()
    }

    /// The reply to `user`, piece by piece. It ends when the model ends its turn or reaches
    /// `settings.maxTokens`, or when the consumer stops listening (the Stop button); what was generated
    /// stays in the stream and the next turn continues from it.
    public nonisolated func reply(to user: String, settings: SamplingSettings) -> AsyncThrowingStream<ReplyUpdate, Error> {
        AsyncThrowingStream { continuation in
            let task = Task {
                do {
                    try await self.generate(user: user, settings: settings, into: continuation)
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }

    private func generate(user: String, settings: SamplingSettings,
                          into continuation: AsyncThrowingStream<ReplyUpdate, Error>.Continuation) throws {
        let prompt = tokenizer.encode(try transcript.prompt(user: user, renderer: renderer))
        let stop = manifest.stopTokens
        var text = TextStream()
        var answer = ""
        var count = 0
        var started = now()
        try stream.generate(prompt: prompt, settings: settings, stop: stop, shouldStop: { Task.isCancelled }) { token in
            if count == 0 { started = now() }  // time decode only, not the prompt
            count += 1
            guard !stop.contains(token) else { return }
            let piece = text.push(token, decoder: tokenizer)
            answer += piece
            let seconds = now() - started
            let status = StreamStatus(tokensPerSecond: count > 1 && seconds > 0 ? Double(count - 1) / seconds : 0,
                                      position: stream.position, capacity: manifest.geometry.capacity,
                                      footprintBytes: footprint())
            continuation.yield(ReplyUpdate(piece: piece, status: status))
        }
        try transcript.finish(answer: answer, renderer: renderer)
    }
}
