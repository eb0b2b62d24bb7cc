import EdgeKVCore
import Foundation
#if canImport(CoreML)
import CoreML
#endif

public enum ModelFolderError: Error, LocalizedError {
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
public struct ModelFolder {
    public let url: URL
    public let manifest: Manifest

    public init(url: URL) throws {
        self.url = url
        manifest = try Manifest.load(folder: url)
        for name in [manifest.files.tokenizer] + [manifest.files.tokenizerConfig, manifest.files.chatTemplate].compactMap({ $0 })
        where !FileManager.default.fileExists(atPath: url.appendingPathComponent(name).path) {
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

    #if canImport(CoreML)
    /// The compiled model: Xcode's `.mlmodelc` beside the manifest when the folder is bundled, else the
    /// `.mlpackage` compiled on this device once and kept in Application Support (keyed by its digest).
    public func compiledModel() async throws -> URL {
        let package = file(manifest.files.model)
        let bundled = package.deletingPathExtension().appendingPathExtension("mlmodelc")
        if FileManager.default.fileExists(atPath: bundled.path) {
            return bundled
        }
        guard FileManager.default.fileExists(atPath: package.path) else {
            throw ModelFolderError.missingFile(manifest.files.model)
        }
        let key = (manifest.digests[manifest.files.model] ?? manifest.source.weightsSha256)
            .replacingOccurrences(of: "sha256:", with: "").prefix(16)
        let cache = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                                appropriateFor: nil, create: true)
            .appendingPathComponent("EdgeKV", isDirectory: true)
        let target = cache.appendingPathComponent("\(key).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) {
            return target
        }
        try FileManager.default.createDirectory(at: cache, withIntermediateDirectories: true)
        let compiled = try await MLModel.compileModel(at: package)
        try FileManager.default.moveItem(at: compiled, to: target)
        return target
    }
    #endif
}
