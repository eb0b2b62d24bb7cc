import Foundation

/// Sampling settings as the app's settings sheet shows them. Temperature 0 is greedy.
public struct SamplingSettings: Equatable, Sendable {
    public var temperature: Float
    public var topK: Int
    public var topP: Float
    public var seed: UInt64?
    public var maxTokens: Int

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64? = nil, maxTokens: Int = 512) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
        self.maxTokens = maxTokens
    }

    public static let greedy = SamplingSettings()
}

/// SplitMix64: a small, fast generator whose sequence depends only on its seed, so a seeded chat
/// samples the same reply every time on every device.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Picks the next token: greedy (first maximum, as NumPy's argmax) when temperature is 0, otherwise
/// temperature, then top-k, then top-p (the smallest set whose probability reaches top-p).
public struct Sampler: Sendable {
    public let settings: SamplingSettings
    private var generator: SeededGenerator

    public init(settings: SamplingSettings) {
        self.settings = settings
        generator = SeededGenerator(seed: settings.seed ?? UInt64.random(in: 0...UInt64.max))
    }

    public static func argmax(_ logits: [Float]) -> Int {
        var best = 0
        for i in logits.indices where logits[i] > logits[best] {
            best = i
        }
        return best
    }

    public struct Candidate: Equatable, Sendable {
        public let token: Int
        public let p: Double
    }

    /// Probabilities after temperature, top-k and top-p, most likely first.
    public static func distribution(_ logits: [Float], settings: SamplingSettings) -> [Candidate] {
        let t = Double(settings.temperature)
        var order = logits.indices.sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        if settings.topK > 0 && settings.topK < order.count {
            order = Array(order.prefix(settings.topK))
        }
        let top = Double(logits[order[0]])
        var weights = order.map { exp((Double(logits[$0]) - top) / t) }
        let total = weights.reduce(0, +)
        weights = weights.map { $0 / total }
        if settings.topP < 1 {
            var mass = 0.0
            var keep = 0
            while keep < weights.count && mass < Double(settings.topP) {
                mass += weights[keep]
                keep += 1
            }
            order = Array(order.prefix(keep))
            weights = Array(weights.prefix(keep)).map { $0 / mass }
        }
        return zip(order, weights).map { Candidate(token: $0.0, p: $0.1) }
    }

    public mutating func next(_ logits: [Float]) -> Int {
        guard settings.temperature > 0 else { return Sampler.argmax(logits) }
        let candidates = Sampler.distribution(logits, settings: settings)
        let u = Double(generator.next() >> 11) / Double(1 << 53)
        var cumulative = 0.0
        for candidate in candidates {
            cumulative += candidate.p
            if u < cumulative { return candidate.token }
        }
        return candidates[candidates.count - 1].token
    }
}
