import Foundation

/// One call into an exported model: `tokens.count` is 1 (the decode entry) or the manifest's
/// `chunk` (the prefill entry), written at absolute stream positions `position ..< position + count`.
/// Returns the logits of the last token. The Core ML binding lives in EdgeKVRuntime; tests use a
/// model written in Swift.
public protocol LogitsModel: AnyObject {
    var chunk: Int { get }
    func logits(tokens: [Int], position: Int) throws -> [Float]
    /// A fresh cache (a new Core ML state).
    func reset() throws
    /// The cache's raw little-endian contents, stacked [2, L, KV, C, D] in the manifest's cache dtype (sessions).
    func readCache() throws -> Data
    /// Replaces the cache's contents with bytes `readCache` returned (or a session's).
    func writeCache(_ bytes: Data) throws
}

extension LogitsModel {
    public func readCache() throws -> Data { throw SessionError.unreadable("this model cannot save its cache") }
    public func writeCache(_ bytes: Data) throws { throw SessionError.unreadable("this model cannot load a cache") }
}

public enum StreamError: Error, Equatable, LocalizedError {
    case emptyFeed
    case streamExhausted(Int)

    public var errorDescription: String? {
        switch self {
        case .emptyFeed:
            return "nothing to feed"
        case .streamExhausted(let position):
            return "the stream reached position \(position), the largest an int32 position holds; start a new chat"
        }
    }
}

/// One continuous stream through a model's fixed cache: knows its position and plans its calls.
public final class TokenStream {
    public let model: LogitsModel
    public let geometry: CacheGeometry
    public private(set) var position = 0

    public init(model: LogitsModel, geometry: CacheGeometry) {
        self.model = model
        self.geometry = geometry
    }

    public func reset() throws {
        try model.reset()
        position = 0
    }

    /// Continues a saved stream: its cache written into the model, at its position.
    public func restore(cache: Data, position: Int) throws {
        try model.writeCache(cache)
        self.position = position
    }

    /// Feeds tokens at the current position (full chunks through prefill, the rest through decode)
    /// and returns the last token's logits.
    public func feed(_ tokens: [Int]) throws -> [Float] {
        guard !tokens.isEmpty else { throw StreamError.emptyFeed }
        guard position + tokens.count <= maxStreamPosition else { throw StreamError.streamExhausted(position) }
        var logits: [Float] = []
        var start = 0
        for n in FeedPlan.callLengths(tokens: tokens.count, chunk: model.chunk) {
            logits = try model.logits(tokens: Array(tokens[start ..< start + n]), position: position)
            position += n
            start += n
        }
        return logits
    }

    /// Feeds the prompt, then samples and feeds one token at a time, calling `onToken` with each new
    /// token until a stop token, `settings.maxTokens` (0: no limit) or `shouldStop()` says so.
    /// Returns the tokens produced (a stop token included, as it is in the stream).
    @discardableResult
    public func generate(prompt: [Int], settings: SamplingSettings, stop: Set<Int>,
                         shouldStop: () -> Bool = { false }, onToken: (Int) -> Void) throws -> [Int] {
        var sampler = Sampler(settings: settings)
        var logits = try feed(prompt)
        var produced: [Int] = []
        while settings.maxTokens <= 0 || produced.count < settings.maxTokens {
            if shouldStop() { break }
            let token = sampler.next(logits)
            produced.append(token)
            onToken(token)
            if stop.contains(token) { break }
            logits = try feed([token])
        }
        return produced
    }
}

/// The status line under the chat: speed, where the stream is, and the memory that does not grow.
public struct StreamStatus: Equatable, Sendable {
    public var tokensPerSecond: Double
    public var position: Int
    public var capacity: Int
    public var footprintBytes: UInt64?

    public init(tokensPerSecond: Double, position: Int, capacity: Int, footprintBytes: UInt64?) {
        self.tokensPerSecond = tokensPerSecond
        self.position = position
        self.capacity = capacity
        self.footprintBytes = footprintBytes
    }

    public var text: String {
        let speed = String(format: "%.1f tok/s", tokensPerSecond)
        let memory = footprintBytes.map { String(format: " · %.0f MB", Double($0) / 1_048_576) } ?? ""
        return "\(speed) · position \(position) · cache \(capacity) slots\(memory)"
    }
}
