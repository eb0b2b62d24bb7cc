import Foundation
import XCTest
@testable import EdgeKVCore

final class ChatViewModelTests: XCTestCase {
    func loader(_ model: ScriptModel) -> ChatViewModel.Loader {
        let clock = QuarterSecondClock()
        return { _ in
            ChatSession(manifest: try Fixture.manifest(eos: 0), model: model, tokenizer: ByteTokenizer(),
                        renderer: ChatMLRenderer(), footprint: { mebibytes412 }, now: { clock.now() })
        }
    }

    /// Waits (without blocking the main actor) until `condition` holds, for at most 10 s.
    @MainActor
    func eventually(_ condition: () -> Bool) async throws {
        let deadline = Date().addingTimeInterval(10)
        while !condition() && Date() < deadline {
            try await Task.sleep(nanoseconds: 1_000_000)
        }
        XCTAssertTrue(condition())
    }

    @MainActor
    func testLoadingAFolderMakesTheChatReady() async throws {
        let chat = ChatViewModel(loader: loader(ScriptModel.greeting()))
        XCTAssertEqual(chat.phase, .noModel)
        XCTAssertNil(chat.send("Hi"))
        let loading = chat.load(folder: URL(fileURLWithPath: "/exports/coreml"))
        XCTAssertEqual(chat.phase, .loading("Loading coreml… (the first load of a package compiles it)"))
        await loading.value
        XCTAssertEqual(chat.phase, .ready)
        XCTAssertEqual(chat.modelName, "llama · S=4 W=28")
        XCTAssertEqual(chat.status?.text, "0.0 tok/s · position 0 · cache 32 slots · 412 MB")
    }

    @MainActor
    func testALoadErrorIsShownAsItsMessage() async throws {
        let chat = ChatViewModel { _ in throw ManifestError.wrongTarget("onnx") }
        await chat.load(folder: URL(fileURLWithPath: "/exports/onnx")).value
        XCTAssertEqual(chat.phase, .failed("this folder is a onnx export; the app runs Core ML: `edgekv export --target coreml`"))
        XCTAssertNil(chat.send("Hi"))
    }

    @MainActor
    func testTheReplyStreamsIntoTheTranscript() async throws {
        let chat = ChatViewModel(loader: loader(ScriptModel.greeting()))
        await chat.load(folder: URL(fileURLWithPath: "/exports/coreml")).value
        chat.settings = .greedy
        XCTAssertNil(chat.send("  \n"))
        let reply = try XCTUnwrap(chat.send("  Hi\n"))
        XCTAssertEqual(chat.phase, .generating)
        XCTAssertNil(chat.send("Again"))  // one reply at a time
        await reply.value
        XCTAssertEqual(chat.phase, .ready)
        XCTAssertEqual(chat.messages, [ChatMessage(id: 1, role: .user, content: "Hi"),
                                       ChatMessage(id: 2, role: .assistant, content: "Hé!")])
        XCTAssertEqual(chat.status?.text, "3.0 tok/s · position 115 · cache 32 slots · 412 MB")
        await chat.newChat()?.value
        XCTAssertEqual(chat.phase, .ready)
        XCTAssertEqual(chat.messages, [])
        XCTAssertEqual(chat.status?.text, "0.0 tok/s · position 0 · cache 32 slots · 412 MB")
    }

    @MainActor
    func testStopKeepsWhatWasSaidAndTheChatGoesOn() async throws {
        let model = ScriptModel(successor: [10: 97, 97: 98, 98: 97], fallback: 97)
        let release = DispatchSemaphore(value: 0)
        model.onDecode = { n in
            if n == 3 { _ = release.wait(timeout: .now() + 10) }  // the third token is being fed when Stop is pressed
        }
        let chat = ChatViewModel(loader: loader(model))
        await chat.load(folder: URL(fileURLWithPath: "/exports/coreml")).value
        chat.settings = SamplingSettings(maxTokens: 1000)
        let reply = try XCTUnwrap(chat.send("Hi"))
        try await eventually { chat.messages.last?.content == "aba" }
        chat.stopGenerating()
        release.signal()
        await reply.value
        XCTAssertEqual(chat.phase, .ready)
        XCTAssertEqual(chat.messages.map(\.content), ["Hi", "aba"])
        model.onDecode = { _ in }
        chat.settings.maxTokens = 2
        await chat.send("Go on")?.value
        XCTAssertEqual(chat.messages.map(\.content), ["Hi", "aba", "Go on", "ab"])
        // The second turn continued the stream right after the stopped reply: 112 + 3, then the new turn.
        XCTAssertEqual(chat.status?.position, 115 + "<|im_end|>\n<|im_start|>user\nGo on<|im_end|>\n<|im_start|>assistant\n".utf8.count + 1)
    }

    @MainActor
    func testABundledModelLoadsAtLaunchOnlyIfThereIsOne() async throws {
        let bundle = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: bundle, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: bundle) }
        let chat = ChatViewModel { url in
            let folder = try ModelFolder(url: url)
            return ChatSession(manifest: folder.manifest, model: ScriptModel.greeting(), tokenizer: ByteTokenizer(),
                               renderer: ChatMLRenderer())
        }
        XCTAssertNil(chat.loadBundledModel(from: bundle))
        XCTAssertNil(chat.loadBundledModel(from: nil))
        XCTAssertEqual(chat.phase, .noModel)
        try Fixture.manifestJSON().write(to: bundle.appendingPathComponent("edgekv.json"))
        await chat.loadBundledModel(from: bundle)?.value
        XCTAssertEqual(chat.phase, .failed("tokenizer.json is missing from the model folder; copy the whole folder `edgekv export` wrote"))
        try Data("{}".utf8).write(to: bundle.appendingPathComponent("tokenizer.json"))
        await chat.load(folder: bundle).value
        XCTAssertEqual(chat.phase, .ready)
        XCTAssertNil(chat.loadBundledModel(from: bundle))  // a model is already open
    }
}
