import Foundation
import XCTest
@testable import EdgeKVCore

final class ChatSessionTests: XCTestCase {
    func session(_ model: ScriptModel, clock: QuarterSecondClock = QuarterSecondClock()) throws -> ChatSession {
        ChatSession(manifest: try Fixture.manifest(eos: 0), model: model, tokenizer: ByteTokenizer(),
                    renderer: ChatMLRenderer(), footprint: { mebibytes412 }, now: { clock.now() })
    }

    func collect(_ updates: AsyncThrowingStream<ReplyUpdate, Error>) async throws -> [ReplyUpdate] {
        var all: [ReplyUpdate] = []
        for try await update in updates {
            all.append(update)
        }
        return all
    }

    func testAReplyStreamsWholeCharactersWithTheStatusLine() async throws {
        let model = ScriptModel.greeting()
        let chat = try session(model)
        let updates = try await collect(chat.reply(to: "Hi", settings: .greedy))
        // The stop token (0) ends the reply without a piece; "é" is two tokens and comes out whole.
        XCTAssertEqual(updates.map(\.piece), ["H", "", "é", "!"])
        XCTAssertEqual(updates.map(\.status.position), [112, 113, 114, 115])
        // Decode speed from the first generated token on, with a clock read ticking 0.25 s.
        XCTAssertEqual(updates.map(\.status.tokensPerSecond), [0, 2, 8.0 / 3, 3])
        XCTAssertEqual(updates.last?.status.text, "3.0 tok/s · position 115 · cache 32 slots · 412 MB")
        XCTAssertEqual(model.calls.map(\.tokens.count), Array(repeating: 8, count: 14) + [1, 1, 1, 1])
        XCTAssertEqual(ByteTokenizer().decode(tokens: model.calls.prefix(14).flatMap(\.tokens)), firstPrompt)
        let position = await chat.position
        let inStream = await chat.inStream
        XCTAssertEqual(position, 116)
        XCTAssertEqual(inStream, firstPrompt + "Hé!")
        let idle = await chat.status()
        XCTAssertEqual(idle, StreamStatus(tokensPerSecond: 0, position: 116, capacity: 32, footprintBytes: mebibytes412))
    }

    func testTheNextTurnFeedsOnlyNewTextWhereTheStreamStands() async throws {
        let model = ScriptModel.greeting()
        let chat = try session(model)
        _ = try await collect(chat.reply(to: "Hi", settings: .greedy))
        let before = model.calls.count
        let second = try await collect(chat.reply(to: "Bye", settings: .greedy))
        XCTAssertEqual(second.map(\.piece).joined(), "Hé!")
        let fed = Array(model.calls[before...])
        XCTAssertEqual(fed.first?.position, 116)
        XCTAssertEqual(ByteTokenizer().decode(tokens: fed.flatMap(\.tokens)),
                       "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nHé!")
        XCTAssertEqual(model.resets, 0)
        let position = await chat.position
        XCTAssertEqual(position, 116 + 64 + 4)
    }

    func testCancellingStopsGenerationAndTheChatGoesOnFromWhatWasSaid() async throws {
        // Never ends by itself: "\n" -> "a", then "a" and "b" alternate.
        let model = ScriptModel(successor: [10: 97, 97: 98, 98: 97], fallback: 97)
        model.onDecode = { n in
            if n == 3 { withUnsafeCurrentTask { $0?.cancel() } }  // Stop while the third token is fed
        }
        let chat = try session(model)
        let pieces = try await collect(chat.reply(to: "Hi", settings: SamplingSettings(maxTokens: 0))).map(\.piece)
        XCTAssertEqual(pieces, ["a", "b", "a"])
        let inStream = await chat.inStream
        XCTAssertEqual(inStream, firstPrompt + "aba")
        try await chat.newChat()
        let position = await chat.position
        XCTAssertEqual([position, model.resets, model.calls.count], [0, 1, 0])
        model.onDecode = { _ in }
        _ = try await collect(chat.reply(to: "Hi", settings: SamplingSettings(maxTokens: 2)))
        XCTAssertEqual(ByteTokenizer().decode(tokens: model.calls.prefix(14).flatMap(\.tokens)), firstPrompt)
    }

    func testAConsumerThatStopsListeningStopsTheModel() async throws {
        let model = ScriptModel(successor: [10: 97, 97: 98, 98: 97], fallback: 97)
        let release = DispatchSemaphore(value: 0)
        model.onDecode = { n in
            if n == 2 { _ = release.wait(timeout: .now() + 10) }  // hold the second token until the consumer left
        }
        let chat = try session(model)
        var heard: [String] = []
        for try await update in chat.reply(to: "Hi", settings: SamplingSettings(maxTokens: 1000)) {
            heard.append(update.piece)
            if heard.count == 2 { break }
        }
        release.signal()
        XCTAssertEqual(heard, ["a", "b"])
        let position = await chat.position
        let inStream = await chat.inStream
        XCTAssertEqual(position, 114)
        XCTAssertEqual(inStream, firstPrompt + "ab")
    }

    func testAModelErrorEndsTheStreamWithIt() async throws {
        final class Broken: LogitsModel, @unchecked Sendable {
            let chunk = 8
            func logits(tokens: [Int], position: Int) throws -> [Float] { throw StreamError.streamExhausted(position) }
            func reset() throws {}
        }
        let chat = ChatSession(manifest: try Fixture.manifest(), model: Broken(), tokenizer: ByteTokenizer(),
                               renderer: ChatMLRenderer())
        do {
            _ = try await collect(chat.reply(to: "Hi", settings: .greedy))
            XCTFail("no error")
        } catch {
            XCTAssertEqual(error as? StreamError, .streamExhausted(0))
        }
    }
}
