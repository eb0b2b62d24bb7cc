import Foundation
import XCTest
@testable import EdgeKVCore

/// Fixtures/session.safetensors was written by runtimes/session.py (tests/test_ios_golden.py) for the fixture
/// manifest at position 37: every one of the 32 slots written, an fp16 cache holding a counting pattern.
final class SessionFileTests: XCTestCase {
    func session() throws -> Data { try Data(contentsOf: Fixture.url("session.safetensors")) }

    func testReadsWhatPythonWrote() throws {
        let manifest = try Fixture.manifest()
        let s = try SessionFile.decode(session(), for: manifest)
        XCTAssertEqual(s.position, 37)
        XCTAssertEqual(s.shape, [2, manifest.architecture.numLayers, manifest.architecture.numKvHeads, 32,
                                 manifest.architecture.headDim])
        XCTAssertEqual(s.cacheDtype, "float16")
        XCTAssertEqual(s.messages.map(\.role), [.system, .user, .assistant])
        XCTAssertEqual(s.messages.map(\.content), ["Be brief.", "Hi", "Hello."])
        XCTAssertEqual(s.inStream, "w1 Be brief. w2 w1 Hi w2 w3 Hello.")
        // fp16 of (i % 2048) / 256 - 4, little-endian: element 1 is -4 + 1/256.
        let halves = s.cache.withUnsafeBytes { Array($0.bindMemory(to: UInt16.self)) }
        XCTAssertEqual(halves.count, s.shape.reduce(1, *))
        XCTAssertEqual(halves[0], 0xC400)  // -4.0
        XCTAssertEqual(halves[1024], 0x0000)  // 1024 / 256 - 4 = 0
    }

    func testWritesWhatItReadsBack() throws {
        let manifest = try Fixture.manifest()
        let s = try SessionFile.decode(session(), for: manifest)
        let again = try SessionFile.decode(s.encoded(for: manifest), for: manifest)
        XCTAssertEqual(again, s)
    }

    func testSHA256MatchesTheStandardVectors() {
        XCTAssertEqual(SHA256.hex(Data()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        XCTAssertEqual(SHA256.hex(Data("abc".utf8)),
                       "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        XCTAssertEqual(SHA256.hex(Data(repeating: 0x61, count: 1_000)),
                       "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3")
    }

    func testRefusesAnotherModelAnotherCacheAndDamage() throws {
        let other = try Manifest.decode(Fixture.manifestJSON { json in json["window"] = 27 })
        XCTAssertThrowsError(try SessionFile.decode(session(), for: other)) {
            XCTAssertEqual($0 as? SessionError, .otherModel(key: "window"))
        }
        let manifest = try Fixture.manifest()
        var flipped = try session()
        flipped[flipped.count - 3] ^= 0x41
        XCTAssertThrowsError(try SessionFile.decode(flipped, for: manifest)) {
            XCTAssertEqual($0 as? SessionError, .corrupt("its checksum"))
        }
        let truncated = try session().prefix(100)
        XCTAssertThrowsError(try SessionFile.decode(Data(truncated), for: manifest)) {
            guard case .unreadable = $0 as? SessionError else { return XCTFail("\($0)") }
        }
    }
}

final class ChatSessionSaveTests: XCTestCase {
    func session(_ model: ScriptModel) throws -> ChatSession {
        ChatSession(manifest: try Fixture.manifest(eos: 0), model: model, tokenizer: ByteTokenizer(),
                    renderer: ChatMLRenderer())
    }

    /// A conversation saved after one reply and restored into a fresh session (a relaunched app) holds the same
    /// messages, position and cache, and its next turn feeds exactly what the unbroken one feeds.
    func testAConversationSurvivesARelaunch() async throws {
        let model = ScriptModel.greeting()
        model.cache = Data((0 ..< model.cache.count).map { UInt8($0 % 251) })
        let chat = try session(model)
        for try await _ in chat.reply(to: "Hi", settings: .greedy) {}
        let saved = try await chat.sessionData()

        let relaunched = ScriptModel.greeting()
        let resumed = try session(relaunched)
        try await resumed.restore(saved)
        let position = await resumed.position, before = await chat.position
        XCTAssertEqual(position, before)
        XCTAssertEqual(position, 116)
        XCTAssertEqual(relaunched.cache, model.cache)  // 116 > 32 slots: every slot came back
        let messages = await resumed.messages.map(\.content)
        XCTAssertEqual(messages, ["Hi", "Hé!"])
        for try await _ in chat.reply(to: "Again", settings: .greedy) {}
        for try await _ in resumed.reply(to: "Again", settings: .greedy) {}
        XCTAssertEqual(relaunched.calls, Array(model.calls.suffix(relaunched.calls.count)))
        XCTAssertEqual(relaunched.calls.first?.position, 116)
    }

    func testARefusedSessionChangesNothing() async throws {
        let model = ScriptModel.greeting()
        let chat = try session(model)
        for try await _ in chat.reply(to: "Hi", settings: .greedy) {}
        var damaged = try await chat.sessionData()
        damaged[damaged.count - 1] ^= 1
        do {
            try await chat.restore(damaged)
            XCTFail("a damaged session was accepted")
        } catch {
            XCTAssertEqual(error as? SessionError, .corrupt("its checksum"))
        }
        let position = await chat.position
        XCTAssertEqual(position, 116)
    }
}
