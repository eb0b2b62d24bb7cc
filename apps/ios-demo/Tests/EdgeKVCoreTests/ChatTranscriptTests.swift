import XCTest
@testable import EdgeKVCore

/// SmolLM2's ChatML template, written out in Swift.
struct ChatMLRenderer: ChatRendering {
    func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) throws -> String {
        var text = ""
        if messages.first?.role != .system {
            text += "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        }
        for m in messages {
            text += "<|im_start|>\(m.role.rawValue)\n\(m.content)<|im_end|>\n"
        }
        return addGenerationPrompt ? text + "<|im_start|>assistant\n" : text
    }
}

final class ChatTranscriptTests: XCTestCase {
    func testEachTurnFeedsOnlyWhatTheStreamLacks() throws {
        var chat = ChatTranscript()
        let r = ChatMLRenderer()
        let first = try chat.prompt(user: "Hi", renderer: r)
        XCTAssertEqual(first, "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
            + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        try chat.finish(answer: "Hello!", renderer: r)
        XCTAssertTrue(chat.inStream.hasSuffix("<|im_start|>assistant\nHello!"))
        let second = try chat.prompt(user: "Bye", renderer: r)
        XCTAssertEqual(second, "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
        XCTAssertEqual(chat.messages.map(\.role), [.user, .assistant, .user])
    }

    func testAnEmptyReplyStillContinuesTheStream() throws {
        var chat = ChatTranscript(system: "Be brief.")
        let r = ChatMLRenderer()
        _ = try chat.prompt(user: "Hi", renderer: r)
        try chat.finish(answer: "", renderer: r)
        let next = try chat.prompt(user: "Again", renderer: r)
        XCTAssertEqual(next, "<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
    }
}
