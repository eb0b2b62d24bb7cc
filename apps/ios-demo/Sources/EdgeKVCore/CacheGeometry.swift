/// The attention-sink + ring-buffer contract (DESIGN.md, exporter/cache.py) as plain arithmetic.
///
/// `sink` slots keep tokens 0..<sink forever; `window` slots form a ring of the most recent tokens.
/// Token p lives in slot p when p < sink, else in slot sink + (p - sink) mod window. The model does
/// this itself; the app uses it to show where the stream is and to plan its calls.
public struct CacheGeometry: Equatable, Sendable {
    public let sink: Int
    public let window: Int

    public init(sink: Int, window: Int) {
        precondition(sink >= 0 && window >= 1, "sink must be >= 0 and window >= 1")
        self.sink = sink
        self.window = window
    }

    /// Slots per layer: the cache never grows past this, however long the stream.
    public var capacity: Int { sink + window }

    /// The slot token `position` is written to.
    public func slot(of position: Int) -> Int {
        position < sink ? position : sink + (position - sink) % window
    }

    /// Slots holding a token once `count` tokens have been fed.
    public func filledSlots(after count: Int) -> Int { min(count, capacity) }

    /// How many times the ring has been overwritten from its first window slot once `count` tokens
    /// have been fed (0 until the cache is full).
    public func wraps(after count: Int) -> Int {
        count <= capacity ? 0 : (count - sink - 1) / window
    }

    /// Absolute positions the token at `position` attends to: the sinks and the last `window` tokens.
    public func visiblePositions(from position: Int) -> [Int] {
        let sinks = Array(0..<min(sink, position + 1))
        let recentStart = max(sink, position - window + 1)
        return sinks + (recentStart <= position ? Array(recentStart...position) : [])
    }

    /// The slots the token at `position` attends to once it is written, in slot order (what the
    /// exported model's mask lets through).
    public func visibleSlots(from position: Int) -> [Int] {
        visiblePositions(from: position).map(slot(of:)).sorted()
    }

    /// The absolute position each slot holds once tokens 0...last were written, -1 for a slot not
    /// written yet (`slot_positions` in exporter/cache.py, which the exported model computes).
    public func heldPositions(through last: Int) -> [Int] {
        (0..<capacity).map { slot in
            if slot < sink { return slot <= last ? slot : -1 }
            let newest = last - sink  // ring index of the newest window token
            let behind = ((newest - (slot - sink)) % window + window) % window
            return newest - behind >= 0 ? sink + newest - behind : -1
        }
    }
}

/// How a run of tokens is fed: full chunks through the prefill entry, the rest one token at a time
/// through decode (the same plan as `Runner.feed` in runtimes/__init__.py).
public enum FeedPlan {
    public static func callLengths(tokens count: Int, chunk: Int) -> [Int] {
        precondition(count >= 0 && chunk >= 1)
        var lengths: [Int] = []
        var left = count
        while left > 0 {
            let n = (chunk > 1 && left >= chunk) ? chunk : 1
            lengths.append(n)
            left -= n
        }
        return lengths
    }
}

/// Core ML takes the position as int32; a stream ends there (about 2.1 billion tokens, years of
/// continuous generation at phone speeds).
public let maxStreamPosition = Int(Int32.max)
