#if canImport(CoreML)
import CoreML
import EdgeKVCore
import Foundation

public enum CoreMLModelError: Error, LocalizedError {
    case missingOutput(String)

    public var errorDescription: String? {
        switch self {
        case .missingOutput(let name):
            return "the model returned no \(name); the package does not match its edgekv.json, export it again"
        }
    }
}

/// An edgekv Core ML package: the decode and prefill functions of one multifunction model sharing
/// one `MLState` (the sink + ring KV cache). Every name comes from the manifest.
@available(iOS 18.0, macOS 15.0, *)
public final class CoreMLModel: LogitsModel {
    public let manifest: Manifest
    public var chunk: Int { manifest.chunk }

    private let decodeModel: MLModel
    private let prefillModel: MLModel
    private var state: MLState
    private let tokensName: String
    private let positionName: String
    private let logitsName: String
    private let cacheName: String

    /// `compiledURL` is the `.mlmodelc` (see `ModelFolder.compiledModel()`).
    public init(compiledURL: URL, manifest: Manifest, computeUnits: MLComputeUnits = .all) throws {
        func load(function: String) throws -> MLModel {
            let configuration = MLModelConfiguration()
            configuration.computeUnits = computeUnits
            configuration.functionName = function
            return try MLModel(contentsOf: compiledURL, configuration: configuration)
        }
        self.manifest = manifest
        let decode = try load(function: manifest.entries.decode)
        decodeModel = decode
        prefillModel = try (manifest.chunk > 1 ? load(function: manifest.entries.prefill) : decode)
        tokensName = try manifest.tensor(.tokens, in: manifest.inputs).name
        positionName = try manifest.tensor(.position, in: manifest.inputs).name
        logitsName = try manifest.tensor(.logits, in: manifest.outputs).name
        cacheName = try manifest.tensor(.cache, in: manifest.state).name
        state = decode.makeState()
    }

    public func reset() throws {
        state = decodeModel.makeState()
    }

    /// The fp16 state's bytes (MLState.withMultiArray, iOS 18), [2, L, KV, C, D] as the manifest lists it.
    public func readCache() throws -> Data {
        state.withMultiArray(for: cacheName) { array in
            array.withUnsafeBytes { Data($0) }
        }
    }

    public func writeCache(_ bytes: Data) throws {
        state.withMultiArray(for: cacheName) { array in
            array.withUnsafeMutableBytes { buffer, _ in
                _ = bytes.copyBytes(to: buffer)
            }
        }
    }

    public func logits(tokens: [Int], position: Int) throws -> [Float] {
        let model = tokens.count == 1 ? decodeModel : prefillModel
        let ids = try MLMultiArray(shape: [1, NSNumber(value: tokens.count)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
            for (i, token) in tokens.enumerated() {
                buffer[i] = Int32(token)
            }
        }
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos[0] = NSNumber(value: Int32(position))
        let inputs = try MLDictionaryFeatureProvider(dictionary: [
            tokensName: MLFeatureValue(multiArray: ids),
            positionName: MLFeatureValue(multiArray: pos),
        ])
        let output = try model.prediction(from: inputs, using: state)
        guard let logits = output.featureValue(for: logitsName)?.multiArrayValue else {
            throw CoreMLModelError.missingOutput(logitsName)
        }
        return MLShapedArray<Float>(converting: logits).scalars
    }
}
#endif
