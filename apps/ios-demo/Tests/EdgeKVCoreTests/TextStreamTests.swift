import XCTest
@testable import EdgeKVCore

final class TextStreamTests: XCTestCase {
    func testMultiByteCharactersAreEmittedWhole() {
        var stream = TextStream()
        let ids = Array("a€b🙂".utf8).map(Int.init)
        let pieces = ids.map { stream.push($0, decoder: ByteTokenizer()) }
        XCTAssertEqual(pieces, ["a", "", "", "€", "b", "", "", "", "🙂"])
        XCTAssertEqual(pieces.joined(), "a€b🙂")
    }

    func testLongStreamsKeepOnlyRecentIds() {
        var stream = TextStream()
        var out = ""
        for id in Array(String(repeating: "edge kv ", count: 500).utf8) {
            out += stream.push(Int(id), decoder: ByteTokenizer())
        }
        XCTAssertEqual(out, String(repeating: "edge kv ", count: 500))
    }
}
