import Foundation

/// `edgekv.json`, written by `edgekv export` beside the model. Every name the app hands to Core ML
/// (inputs, outputs, state, functions), the cache geometry and the special tokens come from here,
/// never from constants. The keys below are checked against `runtimes/edgekv.schema.json` by the
/// Python tests, so the exporter and the app cannot drift apart silently.
public struct Manifest: Codable, Equatable, Sendable {
    /// The manifest format this app reads (`FORMAT_VERSION` in runtimes/manifest.py).
    public static let supportedFormatVersion = 4
    public static let fileName = "edgekv.json"

    public let formatVersion: Int
    public let edgekvVersion: String
    public let target: String
    public let source: Source
    public let architecture: Architecture
    public let sink: Int
    public let window: Int
    public let chunk: Int
    public let vocabSize: Int
    public let specialTokens: SpecialTokens
    public let cacheLayout: String
    public let entries: Entries
    public let inputs: [TensorSpec]
    public let outputs: [TensorSpec]
    public let state: [TensorSpec]
    public let computePrecision: String
    public let minimumDeploymentTarget: String?
    public let quantization: Quantization
    public let files: Files
    public let digests: [String: String]
    /// A pinned system prompt: the artifact's initial session (`edgekv export --system-prompt`).
    public let prefix: Prefix?
    /// A hybrid model's sliding layers (Gemma 3): a plain ring of their model's window, no sink.
    public let local: Local?

    enum CodingKeys: String, CodingKey {
        case formatVersion = "format_version"
        case edgekvVersion = "edgekv_version"
        case target
        case source
        case architecture
        case sink
        case window
        case chunk
        case vocabSize = "vocab_size"
        case specialTokens = "special_tokens"
        case cacheLayout = "cache_layout"
        case entries
        case inputs
        case outputs
        case state
        case computePrecision = "compute_precision"
        case minimumDeploymentTarget = "minimum_deployment_target"
        case quantization
        case files
        case digests
        case prefix
        case local
    }

    /// The sliding layers of a hybrid model and the ring they keep (docs/cache.md, "Hybrid models").
    public struct Local: Codable, Equatable, Sendable {
        public let window: Int
        public let layers: [Int]
    }

    /// Slots per layer in the cache state: the widest layer's (narrower layers leave the rest unused).
    public var cacheSlots: Int { max(sink + window, local?.window ?? 0) }

    /// The session file a pinned system prompt ships as, the prompt's token count and its text.
    public struct Prefix: Codable, Equatable, Sendable {
        public let file: String
        public let tokens: Int
        public let system: String
    }

    public struct Source: Codable, Equatable, Sendable {
        public let model: String
        public let kind: String
        public let weightsSha256: String

        enum CodingKeys: String, CodingKey {
            case model
            case kind
            case weightsSha256 = "weights_sha256"
        }
    }

    public struct Architecture: Codable, Equatable, Sendable {
        public let modelType: String
        public let numLayers: Int
        public let hiddenSize: Int
        public let numHeads: Int
        public let numKvHeads: Int
        public let headDim: Int
        public let maxPositionEmbeddings: Int

        enum CodingKeys: String, CodingKey {
            case modelType = "model_type"
            case numLayers = "num_layers"
            case hiddenSize = "hidden_size"
            case numHeads = "num_heads"
            case numKvHeads = "num_kv_heads"
            case headDim = "head_dim"
            case maxPositionEmbeddings = "max_position_embeddings"
        }
    }

    public struct SpecialTokens: Codable, Equatable, Sendable {
        public let bos: Int?
        public let eos: Int?
        public let pad: Int?
        public let unk: Int?

        /// The ids a chat template refers to by name (transformers puts their text in its context).
        public var templateNames: [(name: String, id: Int)] {
            [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)]
                .compactMap { name, id in id.map { (name, $0) } }
        }
    }

    /// Names of the one-token and the chunk entry (Core ML: functions of the multifunction package).
    public struct Entries: Codable, Equatable, Sendable {
        public let decode: String
        public let prefill: String
    }

    /// Weight quantization (`edgekv export --quantize`): Core ML dequantizes on load, so the app only shows it.
    public struct Quantization: Codable, Equatable, Sendable {
        public let scheme: String
        public let groupSize: Int?
        public let method: String
        public let weights: String
        public let activations: String
        public let cacheDtype: String

        enum CodingKeys: String, CodingKey {
            case scheme
            case groupSize = "group_size"
            case method
            case weights
            case activations
            case cacheDtype = "cache_dtype"
        }
    }

    public struct Files: Codable, Equatable, Sendable {
        public let model: String
        public let tokenizer: String
        public let tokenizerConfig: String?
        public let chatTemplate: String?

        enum CodingKeys: String, CodingKey {
            case model
            case tokenizer
            case tokenizerConfig = "tokenizer_config"
            case chatTemplate = "chat_template"
        }
    }

    public var geometry: CacheGeometry { CacheGeometry(sink: sink, window: window) }

    /// Tokens that end a reply: the end-of-sequence token, when the tokenizer names one.
    public var stopTokens: Set<Int> { Set([specialTokens.eos].compactMap { $0 }) }

    /// The chat's title: the model family and the cache it runs in.
    public var title: String { "\(architecture.modelType) · S=\(sink) W=\(window)" }

    /// The file name (without extension) a package compiled on the device is kept under: the first
    /// 16 hex digits of its digest, so a re-export is compiled again and the same one is not.
    public var compiledModelKey: String {
        let digest = digests[files.model] ?? source.weightsSha256
        return String(digest.replacingOccurrences(of: "sha256:", with: "").prefix(16))
    }

    /// The input, output or state tensor that plays `role`.
    public func tensor(_ role: TensorRole, in list: [TensorSpec]) throws -> TensorSpec {
        guard let spec = list.first(where: { $0.role == role }) else {
            throw ManifestError.missingTensor(role)
        }
        return spec
    }

    public static func decode(_ data: Data) throws -> Manifest {
        // Read the version first so an old or newer artifact gets a clear message, not a key error.
        struct Version: Decodable {
            let formatVersion: Int?
            enum CodingKeys: String, CodingKey { case formatVersion = "format_version" }
        }
        let version: Version
        do {
            version = try JSONDecoder().decode(Version.self, from: data)
        } catch {
            throw ManifestError.corrupt(String(describing: error))
        }
        guard version.formatVersion == supportedFormatVersion else {
            throw ManifestError.unsupportedVersion(version.formatVersion ?? -1)
        }
        do {
            return try JSONDecoder().decode(Manifest.self, from: data)
        } catch {
            throw ManifestError.corrupt(String(describing: error))
        }
    }

    /// Reads `edgekv.json` from an artifact folder and checks it is a Core ML export this app can run.
    public static func load(folder: URL) throws -> Manifest {
        let url = folder.appendingPathComponent(fileName)
        guard let data = try? Data(contentsOf: url) else {
            throw ManifestError.missing(folder.lastPathComponent)
        }
        let manifest = try decode(data)
        try manifest.checkRunnableOnCoreML()
        return manifest
    }

    public func checkRunnableOnCoreML() throws {
        guard target == "coreml" else { throw ManifestError.wrongTarget(target) }
        _ = try tensor(.tokens, in: inputs)
        _ = try tensor(.position, in: inputs)
        _ = try tensor(.logits, in: outputs)
        _ = try tensor(.cache, in: state)
        guard chunk >= 1, window >= 1, sink >= 0 else { throw ManifestError.corrupt("bad cache geometry") }
    }
}

public enum TensorRole: String, Codable, Sendable, CaseIterable {
    case tokens
    case position
    case logits
    case cache
    /// A chunk's new cache entries, written by the caller into the cache's slots (ONNX, OpenVINO; never Core ML).
    case cacheUpdate = "cache_update"
}

public struct TensorSpec: Codable, Equatable, Sendable {
    public let role: TensorRole
    public let name: String
    public let dtype: String
    public let shape: [Dimension]

    /// A fixed size, or a symbol such as "T" (tokens per call: 1 for decode, `chunk` for prefill).
    public enum Dimension: Codable, Equatable, Sendable {
        case fixed(Int)
        case symbolic(String)

        public init(from decoder: Decoder) throws {
            let container = try decoder.singleValueContainer()
            if let size = try? container.decode(Int.self) {
                self = .fixed(size)
            } else {
                self = .symbolic(try container.decode(String.self))
            }
        }

        public func encode(to encoder: Encoder) throws {
            var container = encoder.singleValueContainer()
            switch self {
            case .fixed(let size): try container.encode(size)
            case .symbolic(let name): try container.encode(name)
            }
        }
    }
}

public enum ManifestError: Error, Equatable, LocalizedError {
    case missing(String)
    case corrupt(String)
    case unsupportedVersion(Int)
    case wrongTarget(String)
    case missingTensor(TensorRole)

    public var errorDescription: String? {
        switch self {
        case .missing(let folder):
            return "\(folder) has no \(Manifest.fileName): choose the folder `edgekv export --target coreml` wrote"
        case .corrupt(let detail):
            return "\(Manifest.fileName) is corrupt (\(detail)); re-export with `edgekv export --target coreml --force`"
        case .unsupportedVersion(let version):
            return "\(Manifest.fileName) has format version \(version), this app reads \(Manifest.supportedFormatVersion): "
                + "export again with the edgekv that matches this app"
        case .wrongTarget(let target):
            return "this folder is a \(target) export; the app runs Core ML: `edgekv export --target coreml`"
        case .missingTensor(let role):
            return "\(Manifest.fileName) names no \(role.rawValue) tensor; re-export with `edgekv export --target coreml --force`"
        }
    }
}
