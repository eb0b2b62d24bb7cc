import EdgeKVCore
import Foundation
import Hub
import Tokenizers

/// swift-transformers' tokenizer for the folder's tokenizer.json and tokenizer_config.json.
public final class HFTokenizer: TokenDecoding {
    private let tokenizer: Tokenizer

    public init(folder: ModelFolder) throws {
        let data = try Data(contentsOf: folder.file(folder.manifest.files.tokenizer))
        guard let tokenizerData = try JSONSerialization.jsonObject(with: data) as? [NSString: Any] else {
            throw ManifestError.corrupt("\(folder.manifest.files.tokenizer) is not a JSON object")
        }
        var config = try folder.tokenizerConfig()
        let modelType = (tokenizerData["model"] as? [String: Any])?["type"] as? String
        config["tokenizer_class"] = TokenizerClass.resolve(declared: config["tokenizer_class"] as? String,
                                                          modelType: modelType)
        let tokenizerConfig = Dictionary(uniqueKeysWithValues: config.map { (NSString(string: $0.key), $0.value) })
        tokenizer = try AutoTokenizer.from(tokenizerConfig: Config(tokenizerConfig), tokenizerData: Config(tokenizerData))
    }

    /// Ids of `text` as the chat template wrote it: no extra special tokens.
    public func encode(_ text: String) -> [Int] {
        tokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(tokens: [Int]) -> String {
        tokenizer.decode(tokens: tokens)
    }

    public func token(for id: Int?) -> String? {
        id.flatMap { tokenizer.convertIdToToken($0) }
    }
}
