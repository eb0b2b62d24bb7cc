import Foundation

public enum ModelFolderError: Error, Equatable, LocalizedError {
    case missingFile(String)

    public var errorDescription: String? {
        switch self {
        case .missingFile(let name):
            return "\(name) is missing from the model folder; copy the whole folder `edgekv export` wrote"
        }
    }
}

/// An artifact folder written by `edgekv export --target coreml`: the app bundle's resources (where
/// Xcode has compiled the package to `.mlmodelc`) or a folder imported through the Files app.
/// Compiling the package for the device is EdgeKVRuntime's (`compiledModel()`), as it needs Core ML.
public struct ModelFolder: Sendable {
    public let url: URL
    public let manifest: Manifest

    public init(url: URL) throws {
        self.url = url
        manifest = try Manifest.load(folder: url)
        let needed = [manifest.files.tokenizer] + [manifest.files.tokenizerConfig, manifest.files.chatTemplate].compactMap { $0 }
        for name in needed where !FileManager.default.fileExists(atPath: url.appendingPathComponent(name).path) {
            throw ModelFolderError.missingFile(name)
        }
    }

    public func file(_ name: String) -> URL { url.appendingPathComponent(name) }

    /// The chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`.
    public func chatTemplateSource() throws -> String? {
        if let name = manifest.files.chatTemplate {
            return try String(contentsOf: file(name), encoding: .utf8)
        }
        return try tokenizerConfig()["chat_template"] as? String
    }

    public func tokenizerConfig() throws -> [String: Any] {
        guard let name = manifest.files.tokenizerConfig else { return [:] }
        return try JSONSerialization.jsonObject(with: Data(contentsOf: file(name))) as? [String: Any] ?? [:]
    }

    /// tokenizer.json and tokenizer_config.json as swift-transformers takes them, the config's
    /// `tokenizer_class` replaced by one it implements (see `TokenizerClass`).
    public func tokenizerFiles() throws -> (tokenizer: [String: Any], config: [String: Any]) {
        let name = manifest.files.tokenizer
        guard let tokenizer = try JSONSerialization.jsonObject(with: Data(contentsOf: file(name))) as? [String: Any]
        else { throw ManifestError.corrupt("\(name) is not a JSON object") }
        var config = try tokenizerConfig()
        let modelType = (tokenizer["model"] as? [String: Any])?["type"] as? String
        config["tokenizer_class"] = TokenizerClass.resolve(declared: config["tokenizer_class"] as? String,
                                                          modelType: modelType)
        return (tokenizer, config)
    }
}
