import Foundation
import XCTest
@testable import EdgeKVCore

final class ModelFolderTests: XCTestCase {
    var folder: URL!

    override func setUpWithError() throws {
        folder = FileManager.default.temporaryDirectory.appendingPathComponent("export-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try FileManager.default.removeItem(at: folder)
    }

    func write(_ text: String, _ name: String) throws {
        try Data(text.utf8).write(to: folder.appendingPathComponent(name))
    }

    /// The fixture manifest naming a tokenizer config (and a chat template file if `template`).
    func writeManifest(template: Bool) throws {
        let data = try Fixture.manifestJSON { json in
            var files = json["files"] as? [String: Any] ?? [:]
            files["tokenizer_config"] = "tokenizer_config.json"
            if template { files["chat_template"] = "chat_template.jinja" }
            json["files"] = files
        }
        try data.write(to: folder.appendingPathComponent("edgekv.json"))
    }

    func testReadsTheTokenizerAndTheChatTemplate() throws {
        try writeManifest(template: true)
        try write(#"{"model": {"type": "BPE", "vocab": {}}}"#, "tokenizer.json")
        try write(#"{"tokenizer_class": "TokenizersBackend", "chat_template": "from the config"}"#, "tokenizer_config.json")
        try write("{% for m in messages %}{{ m.content }}{% endfor %}", "chat_template.jinja")
        let model = try ModelFolder(url: folder)
        XCTAssertEqual(try model.chatTemplateSource(), "{% for m in messages %}{{ m.content }}{% endfor %}")
        let (tokenizer, config) = try model.tokenizerFiles()
        XCTAssertEqual((tokenizer["model"] as? [String: Any])?["type"] as? String, "BPE")
        // transformers 5's class name is replaced by the one swift-transformers implements for BPE.
        XCTAssertEqual(config["tokenizer_class"] as? String, "GPT2Tokenizer")
        XCTAssertEqual(config["chat_template"] as? String, "from the config")
        XCTAssertEqual(model.file("tokenizer.json").lastPathComponent, "tokenizer.json")
    }

    func testTheTemplateMayLiveInTheTokenizerConfig() throws {
        try writeManifest(template: false)
        try write("{}", "tokenizer.json")
        try write(#"{"tokenizer_class": "LlamaTokenizerFast", "chat_template": "{{ bos_token }}"}"#, "tokenizer_config.json")
        let model = try ModelFolder(url: folder)
        XCTAssertEqual(try model.chatTemplateSource(), "{{ bos_token }}")
        XCTAssertEqual(try model.tokenizerFiles().config["tokenizer_class"] as? String, "LlamaTokenizer")
    }

    func testMissingPiecesAreNamed() throws {
        XCTAssertThrowsError(try ModelFolder(url: folder)) {
            XCTAssertEqual($0 as? ManifestError, .missing(folder.lastPathComponent))
        }
        try writeManifest(template: true)
        try write("{}", "tokenizer.json")
        try write("{}", "tokenizer_config.json")
        XCTAssertThrowsError(try ModelFolder(url: folder)) {
            XCTAssertEqual($0 as? ModelFolderError, .missingFile("chat_template.jinja"))
            XCTAssertEqual($0.localizedDescription,
                           "chat_template.jinja is missing from the model folder; copy the whole folder `edgekv export` wrote")
        }
        try write("[1, 2]", "tokenizer.json")
        try write("", "chat_template.jinja")
        XCTAssertThrowsError(try ModelFolder(url: folder).tokenizerFiles()) {
            XCTAssertEqual($0 as? ManifestError, .corrupt("tokenizer.json is not a JSON object"))
        }
    }

    func testAnotherTargetsExportIsRefused() throws {
        try Fixture.manifestJSON { $0["target"] = "openvino" }.write(to: folder.appendingPathComponent("edgekv.json"))
        XCTAssertThrowsError(try ModelFolder(url: folder)) {
            XCTAssertEqual($0.localizedDescription,
                           "this folder is a openvino export; the app runs Core ML: `edgekv export --target coreml`")
        }
    }
}
