import XCTest
@testable import EdgeKVCore

/// A model written in Swift: records every call; its logits make token (position + 1) % vocab win.
final class RecordingModel: LogitsModel {
    let chunk: Int
    let vocab: Int
    struct Call: Equatable {
        let count: Int
        let position: Int
    }

    var calls: [Call] = []
    var resets = 0

    init(chunk: Int, vocab: Int) {
        self.chunk = chunk
        self.vocab = vocab
    }

    func logits(tokens: [Int], position: Int) throws -> [Float] {
        calls.append(Call(count: tokens.count, position: position))
        var out = [Float](repeating: 0, count: vocab)
        out[(position + tokens.count) % vocab] = 1
        return out
    }

    func reset() throws { resets += 1 }
}

final class TokenStreamTests: XCTestCase {
    func testPromptGoesThroughChunksThenDecodeAndPositionsContinue() throws {
        let model = RecordingModel(chunk: 64, vocab: 1000)
        let stream = TokenStream(model: model, geometry: CacheGeometry(sink: 4, window: 60))
        var seen: [Int] = []
        let produced = try stream.generate(prompt: Array(0..<130), settings: SamplingSettings(maxTokens: 3),
                                           stop: []) { seen.append($0) }
        XCTAssertEqual(model.calls.map(\.count), [64, 64, 1, 1, 1, 1, 1])
        XCTAssertEqual(model.calls.map(\.position), [0, 64, 128, 129, 130, 131, 132])
        XCTAssertEqual(produced, [130, 131, 132])
        XCTAssertEqual(seen, produced)
        // The last token is fed too: it is part of the reply the next turn continues from.
        XCTAssertEqual(stream.position, 133)
        // The next turn continues the same stream: no reset, positions go on past the ring.
        _ = try stream.generate(prompt: [7], settings: SamplingSettings(maxTokens: 1), stop: []) { _ in }
        XCTAssertEqual(model.calls[7], RecordingModel.Call(count: 1, position: 133))
        XCTAssertEqual(model.resets, 0)
    }

    func testStopsAtTheEndTokenAndOnRequest() throws {
        let model = RecordingModel(chunk: 8, vocab: 1000)
        let stream = TokenStream(model: model, geometry: CacheGeometry(sink: 4, window: 4))
        let produced = try stream.generate(prompt: [1, 2], settings: SamplingSettings(maxTokens: 0), stop: [5]) { _ in }
        XCTAssertEqual(produced, [2, 3, 4, 5])
        var asked = 0
        let stopped = try stream.generate(prompt: [1], settings: SamplingSettings(maxTokens: 0), stop: [],
                                          shouldStop: { asked += 1; return asked > 10 }) { _ in }
        XCTAssertEqual(stopped.count, 10)
        try stream.reset()
        XCTAssertEqual(stream.position, 0)
        XCTAssertEqual(model.resets, 1)
    }

    func testStatusLineText() {
        let status = StreamStatus(tokensPerSecond: 23.456, position: 51234, capacity: 1024, footprintBytes: 412 * 1_048_576)
        XCTAssertEqual(status.text, "23.5 tok/s · position 51234 · cache 1024 slots · 412 MB")
        XCTAssertEqual(StreamStatus(tokensPerSecond: 0, position: 0, capacity: 8, footprintBytes: nil).text,
                       "0.0 tok/s · position 0 · cache 8 slots")
    }

    func testTokenizerClassFallsBackToTheModelType() {
        XCTAssertEqual(TokenizerClass.resolve(declared: "TokenizersBackend", modelType: "BPE"), "GPT2Tokenizer")
        XCTAssertEqual(TokenizerClass.resolve(declared: "LlamaTokenizerFast", modelType: "BPE"), "LlamaTokenizer")
        XCTAssertEqual(TokenizerClass.resolve(declared: nil, modelType: "Unigram"), "T5Tokenizer")
        XCTAssertNil(TokenizerClass.resolve(declared: "Mystery", modelType: "Mystery"))
    }
}
