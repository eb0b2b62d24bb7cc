import XCTest
@testable import EdgeKVCore

/// Byte-level ids: each id is one UTF-8 byte, the hard case for streaming (a character spans ids).
struct ByteDecoder: TokenDecoding {
    func decode(tokens: [Int]) -> String {
        String(decoding: tokens.map { UInt8($0) }, as: UTF8.self)
    }
}

final class TextStreamTests: XCTestCase {
    func testMultiByteCharactersAreEmittedWhole() {
        var stream = TextStream()
        let ids = Array("a€b🙂".utf8).map(Int.init)
        let pieces = ids.map { stream.push($0, decoder: ByteDecoder()) }
        XCTAssertEqual(pieces, ["a", "", "", "€", "b", "", "", "", "🙂"])
        XCTAssertEqual(pieces.joined(), "a€b🙂")
    }

    func testLongStreamsKeepOnlyRecentIds() {
        var stream = TextStream()
        var out = ""
        for id in Array(String(repeating: "edge kv ", count: 500).utf8) {
            out += stream.push(Int(id), decoder: ByteDecoder())
        }
        XCTAssertEqual(out, String(repeating: "edge kv ", count: 500))
    }
}
