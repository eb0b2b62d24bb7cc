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

    /// The conversation as a session file (runtimes/session.py's format): the slots written so far, the position,
    /// the messages. The app saves it when it goes to the background.
    public func sessionData() throws -> Data {
        let a = manifest.architecture, slots = manifest.cacheSlots
        let dtype = try manifest.tensor(.cache, in: manifest.state).dtype
        let row = a.headDim * (dtype == "float16" ? 2 : 4)
        let kept = min(stream.position, slots)
        let full = [UInt8](try stream.model.readCache())
        guard full.count == 2 * a.numLayers * a.numKvHeads * slots * row else {
            throw SessionError.corrupt("the model's cache has \(full.count) bytes")
        }
        var cache = Data(capacity: 2 * a.numLayers * a.numKvHeads * kept * row)
        for block in 0 ..< 2 * a.numLayers * a.numKvHeads {  // each [C, D] block's first `kept` slots
            cache.append(contentsOf: full[block * slots * row ..< (block * slots + kept) * row])
        }
        return try SessionFile(cacheDtype: dtype, shape: [2, a.numLayers, a.numKvHeads, kept, a.headDim], cache: cache,
                               position: stream.position, messages: transcript.messages,
                               inStream: transcript.inStream).encoded(for: manifest)
    }

    /// Resumes the conversation in `data`: a saved session, or the artifact's `prefix.safetensors` (a pinned
    /// system prompt, whose cache is then used with no prefill). Checked before anything changes.
    public func restore(_ data: Data) throws {
        let s = try SessionFile.decode(data, for: manifest)
        let dtype = try manifest.tensor(.cache, in: manifest.state).dtype
        guard s.cacheDtype == dtype else {
            throw SessionError.corrupt("a \(s.cacheDtype) cache for a \(dtype) model; resume it where it was saved")
        }
        let slots = manifest.cacheSlots, kept = s.shape[3], row = s.cache.count / max(1, s.shape[0 ... 3].reduce(1, *))
        var full = Data(count: s.shape[0] * s.shape[1] * s.shape[2] * slots * row)  // unwritten slots: never read
        for block in 0 ..< s.shape[0] * s.shape[1] * s.shape[2] {
            full.replaceSubrange(block * slots * row ..< (block * slots + kept) * row,
                                 with: s.cache[block * kept * row ..< (block + 1) * kept * row])
        }
        try stream.restore(cache: full, position: s.position)
        transcript = ChatTranscript(messages: s.messages, inStream: s.inStream)
    }

    /// The messages of the conversation (a resumed one included).
    public var messages: [ChatMessage] { transcript.messages }

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
