import Foundation
import XCTest
@testable import EdgeKVCore

/// The test target's Fixtures/ folder and manifests made from its edgekv.json.
enum Fixture {
    static func url(_ path: String) throws -> URL {
        try XCTUnwrap(Bundle.module.url(forResource: "Fixtures", withExtension: nil)).appendingPathComponent(path)
    }

    static func manifestJSON(_ edit: (inout [String: Any]) -> Void = { _ in }) throws -> Data {
        var json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(contentsOf: url("edgekv.json"))) as? [String: Any])
        edit(&json)
        return try JSONSerialization.data(withJSONObject: json)
    }

    /// Fixtures/edgekv.json (tiny Llama, S=4, W=28, chunk 8), its end-of-sequence id set to `eos`.
    static func manifest(eos: Int? = nil) throws -> Manifest {
        try Manifest.decode(manifestJSON { json in
            var tokens = json["special_tokens"] as? [String: Any] ?? [:]
            tokens["eos"] = eos ?? NSNull()
            json["special_tokens"] = tokens
        })
    }
}

/// Byte-level ids: each id is one UTF-8 byte, the hard case for streaming (a character spans ids).
struct ByteTokenizer: ChatTokenizer {
    func encode(_ text: String) -> [Int] { text.utf8.map(Int.init) }

    func decode(tokens: [Int]) -> String {
        String(decoding: tokens.map { UInt8($0) }, as: UTF8.self)
    }
}

/// A model written in Swift whose next token depends only on the last one fed (`successor`, else
/// `fallback`), so a reply is a fixed script. Records every call; `onDecode(n)` runs during the n-th
/// single-token call since the last prompt.
/// Unchecked Sendable: tests read it only once the session is done with it.
final class ScriptModel: LogitsModel, @unchecked Sendable {
    struct Call: Equatable {
        let tokens: [Int]
        let position: Int
    }

    let chunk = 8
    let successor: [Int: Int]
    let fallback: Int
    var onDecode: (Int) -> Void = { _ in }
    private(set) var calls: [Call] = []
    private(set) var resets = 0
    private var decodes = 0

    init(successor: [Int: Int], fallback: Int) {
        self.successor = successor
        self.fallback = fallback
    }

    /// Answers "Hé!" (four byte tokens, one character spanning two) to any prompt ending in a newline, then 0.
    static func greeting() -> ScriptModel {
        ScriptModel(successor: [10: 72, 72: 0xC3, 0xC3: 0xA9, 0xA9: 33], fallback: 0)
    }

    func logits(tokens: [Int], position: Int) throws -> [Float] {
        calls.append(Call(tokens: tokens, position: position))
        decodes = tokens.count == 1 ? decodes + 1 : 0
        if tokens.count == 1 { onDecode(decodes) }
        var out = [Float](repeating: 0, count: 256)
        out[successor[tokens[tokens.count - 1]] ?? fallback] = 1
        return out
    }

    func reset() throws {
        resets += 1
        calls = []
    }

    /// A cache to save and restore (sessions): whatever bytes were last written, zeros of the fixture's size at first.
    var cache = Data(count: 2 * 2 * 2 * 32 * 16 * 2)  // [2, L=2, KV=2, C=32, D=16] fp16

    func readCache() throws -> Data { cache }

    func writeCache(_ bytes: Data) throws { cache = bytes }
}

/// A clock that moves a quarter second each time it is read.
final class QuarterSecondClock: @unchecked Sendable {
    private let lock = NSLock()
    private var reads = 0

    func now() -> Double {
        lock.lock()
        defer { lock.unlock() }
        reads += 1
        return Double(reads) * 0.25
    }
}

/// SmolLM2's system prompt and first user turn ("Hi") as ChatMLRenderer writes them: 112 bytes.
let firstPrompt = "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    + "<|im_start|>assistant\n"
let mebibytes412: UInt64 = 412 * 1_048_576
