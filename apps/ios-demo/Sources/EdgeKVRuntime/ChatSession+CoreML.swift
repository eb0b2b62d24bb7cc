#if canImport(CoreML)
import CoreML
import EdgeKVCore
import Foundation

extension ModelFolder {
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
        let cache = try FileManager.default.url(for: .applicationSupportDirectory, in: .userDomainMask,
                                                appropriateFor: nil, create: true)
            .appendingPathComponent("EdgeKV", isDirectory: true)
        let target = cache.appendingPathComponent("\(manifest.compiledModelKey).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) {
            return target
        }
        try FileManager.default.createDirectory(at: cache, withIntermediateDirectories: true)
        let compiled = try await MLModel.compileModel(at: package)
        try FileManager.default.moveItem(at: compiled, to: target)
        return target
    }
}

@available(iOS 18.0, macOS 15.0, *)
extension ChatSession {
    /// A session over an export folder: its Core ML package, tokenizer and chat template.
    public static func load(folder url: URL) async throws -> ChatSession {
        let folder = try ModelFolder(url: url)
        let compiled = try await folder.compiledModel()
        let model = try CoreMLModel(compiledURL: compiled, manifest: folder.manifest)
        let tokenizer = try HFTokenizer(folder: folder)
        let template = try JinjaChatTemplate(folder: folder, tokenizer: tokenizer)
        return ChatSession(manifest: folder.manifest, model: model, tokenizer: tokenizer, renderer: template,
                           footprint: { memoryFootprintBytes() })
    }
}
#endif
