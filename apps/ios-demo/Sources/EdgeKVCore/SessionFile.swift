import Foundation

/// A session file (runtimes/session.py): the stream's cache and position, so a conversation survives the app
/// being killed, and the artifact's `prefix.safetensors` (a pinned system prompt) is where a chat starts.
///
/// safetensors: an 8-byte little-endian header length, a JSON header (the tensor `cache` [2, L, KV, n, D],
/// n = min(position, C), and string metadata), then the raw little-endian cache bytes. Read and written here
/// with Foundation alone, the cache checked against its SHA-256 and the session against the manifest.
public struct SessionFile: Equatable, Sendable {
    public static let format = "1"

    /// "float16" or "float32".
    public var cacheDtype: String
    /// [2, layers, kv heads, written slots, head_dim].
    public var shape: [Int]
    /// The cache's raw little-endian bytes, `shape` in row-major order.
    public var cache: Data
    public var position: Int
    /// The conversation the stream holds: its messages and the rendered text already fed.
    public var messages: [ChatMessage]
    public var inStream: String

    public init(cacheDtype: String, shape: [Int], cache: Data, position: Int, messages: [ChatMessage],
                inStream: String) {
        self.cacheDtype = cacheDtype
        self.shape = shape
        self.cache = cache
        self.position = position
        self.messages = messages
        self.inStream = inStream
    }
}

public enum SessionError: Error, Equatable, LocalizedError {
    case unreadable(String)
    case otherModel(key: String)
    case corrupt(String)

    public var errorDescription: String? {
        switch self {
        case .unreadable(let why):
            return "not a readable session file (\(why)); start a new chat"
        case .otherModel(let key):
            return "the session was saved from another model or cache (\(key) differs); start a new chat"
        case .corrupt(let why):
            return "the session file is corrupt (\(why)); start a new chat"
        }
    }
}

extension SessionFile {
    /// The manifest keys a session must agree on (`SESSION_IDENTITY` in runtimes/session.py).
    static func identity(of m: Manifest) -> [String: Any] {
        ["format_version": m.formatVersion, "sink": m.sink, "window": m.window, "vocab_size": m.vocabSize,
         "source.weights_sha256": m.source.weightsSha256, "quantization.scheme": m.quantization.scheme,
         "architecture.num_layers": m.architecture.numLayers,
         "architecture.num_kv_heads": m.architecture.numKvHeads, "architecture.head_dim": m.architecture.headDim]
    }

    /// The metadata the checksum covers after the cache bytes (`CHECKED` in runtimes/session.py).
    static let checked = ["edgekv_session", "identity", "position", "cache_dtype", "state"]

    /// SHA-256 of the cache bytes, then of each checked metadata string after a newline: a flipped digit of the
    /// position fails it as a flipped bit of the cache does.
    static func checksum(_ cache: Data, _ meta: [String: String]) -> String? {
        var bytes = cache
        for key in checked {
            guard let value = meta[key] else { return nil }
            bytes.append(0x0A)
            bytes.append(contentsOf: Array(value.utf8))
        }
        return SHA256.hex(bytes)
    }

    /// Reads and checks a session for `manifest`'s artifact: format, checksum, identity, shape.
    public static func decode(_ data: Data, for manifest: Manifest) throws -> SessionFile {
        let bytes = [UInt8](data)
        guard bytes.count >= 8 else { throw SessionError.unreadable("\(bytes.count) bytes") }
        let length = bytes[0 ..< 8].enumerated().reduce(0) { $0 | (Int($1.element) << (8 * $1.offset)) }
        guard length > 1, length <= bytes.count - 8,
              let header = try? JSONSerialization.jsonObject(with: Data(bytes[8 ..< 8 + length])) as? [String: Any],
              let meta = header["__metadata__"] as? [String: String],
              let tensor = header["cache"] as? [String: Any],
              let dtype = tensor["dtype"] as? String, let shape = tensor["shape"] as? [Int],
              let offsets = tensor["data_offsets"] as? [Int], offsets.count == 2,
              offsets[0] >= 0, offsets[0] <= offsets[1], 8 + length + offsets[1] <= bytes.count
        else { throw SessionError.unreadable("no safetensors header with a cache") }
        guard meta["edgekv_session"] == format else { throw SessionError.unreadable("not an edgekv session") }
        let cache = Data(bytes[(8 + length + offsets[0]) ..< (8 + length + offsets[1])])
        guard checksum(cache, meta) == meta["sha256"] else { throw SessionError.corrupt("its checksum") }
        guard let identityText = meta["identity"], let positionText = meta["position"],
              let position = Int(positionText), position >= 0,
              let saved = try? JSONSerialization.jsonObject(with: Data(identityText.utf8)) as? [String: Any],
              let stateText = meta["state"],
              let state = try? JSONSerialization.jsonObject(with: Data(stateText.utf8)) as? [String: Any]
        else { throw SessionError.corrupt("its metadata") }
        for (key, want) in identity(of: manifest).sorted(by: { $0.key < $1.key }) {
            guard let got = saved[key], "\(got)" == "\(want)" else { throw SessionError.otherModel(key: key) }
        }
        let geometry = manifest.architecture
        let width = ["F16": 2, "F32": 4][dtype] ?? 0
        let expected = [2, geometry.numLayers, geometry.numKvHeads, min(position, manifest.cacheSlots),
                        geometry.headDim]
        guard width > 0, shape == expected, cache.count == shape.reduce(width, *) else {
            throw SessionError.corrupt("cache \(shape) \(dtype) at position \(position)")
        }
        var messages: [ChatMessage] = []
        for (i, item) in ((state["messages"] as? [[String: String]]) ?? []).enumerated() {
            guard let role = item["role"].flatMap(ChatMessage.Role.init(rawValue:)), let content = item["content"]
            else { throw SessionError.corrupt("message \(i)") }
            messages.append(ChatMessage(id: i, role: role, content: content))
        }
        return SessionFile(cacheDtype: dtype == "F16" ? "float16" : "float32", shape: shape, cache: cache,
                           position: position, messages: messages, inStream: state["in_stream"] as? String ?? "")
    }

    /// The file Python's `runtimes.session.read_session` reads back (and this type decodes).
    public func encoded(for manifest: Manifest) throws -> Data {
        let state: [String: Any] = ["messages": messages.map { ["role": $0.role.rawValue, "content": $0.content] },
                                    "in_stream": inStream]
        func json(_ value: Any) throws -> String {
            String(decoding: try JSONSerialization.data(withJSONObject: value, options: [.sortedKeys]), as: UTF8.self)
        }
        var meta: [String: String] = [
            "edgekv_session": Self.format, "identity": try json(Self.identity(of: manifest)),
            "position": String(position), "cache_dtype": cacheDtype, "state": try json(state),
        ]
        meta["sha256"] = Self.checksum(cache, meta)
        let header: [String: Any] = [
            "__metadata__": meta,
            "cache": ["dtype": cacheDtype == "float16" ? "F16" : "F32", "shape": shape,
                      "data_offsets": [0, cache.count]] as [String: Any],
        ]
        var head = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while head.count % 8 != 0 { head.append(0x20) }  // safetensors pads the header with spaces
        var out = Data((0 ..< 8).map { UInt8((head.count >> (8 * $0)) & 0xFF) })
        out.append(head)
        out.append(cache)
        return out
    }
}

/// SHA-256 (FIPS 180-4), for the session checksum: CryptoKit is Apple-only and the package fetches nothing.
enum SHA256 {
    private static let k: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]

    static func hex(_ data: Data) -> String {
        var h: [UInt32] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                           0x5be0cd19]
        var message = [UInt8](data)
        let bits = UInt64(message.count) * 8
        message.append(0x80)
        while message.count % 64 != 56 { message.append(0) }
        message += (0 ..< 8).reversed().map { UInt8((bits >> (8 * UInt64($0))) & 0xFF) }
        var w = [UInt32](repeating: 0, count: 64)
        for block in stride(from: 0, to: message.count, by: 64) {
            for i in 0 ..< 16 {
                w[i] = (0 ..< 4).reduce(0) { $0 << 8 | UInt32(message[block + 4 * i + $1]) }
            }
            for i in 16 ..< 64 {
                let s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
                let s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
                w[i] = w[i - 16] &+ s0 &+ w[i - 7] &+ s1
            }
            var (a, b, c, d, e, f, g, hh) = (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])
            for i in 0 ..< 64 {
                let t1 = hh &+ (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) &+ ((e & f) ^ (~e & g)) &+ k[i] &+ w[i]
                let t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) &+ ((a & b) ^ (a & c) ^ (b & c))
                (hh, g, f, e, d, c, b, a) = (g, f, e, d &+ t1, c, b, a, t1 &+ t2)
            }
            for (i, v) in [a, b, c, d, e, f, g, hh].enumerated() { h[i] = h[i] &+ v }
        }
        return h.map { String(format: "%08x", $0) }.joined()
    }

    private static func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 { (x >> n) | (x << (32 - n)) }
}
