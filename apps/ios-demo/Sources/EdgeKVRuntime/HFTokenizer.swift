import EdgeKVCore
import Foundation
import Hub
import Tokenizers

/// swift-transformers' tokenizer for the folder's tokenizer.json and tokenizer_config.json.
public final class HFTokenizer: ChatTokenizer {
    private let tokenizer: Tokenizer

    public init(folder: ModelFolder) throws {
        let (tokenizerData, config) = try folder.tokenizerFiles()
        func keyed(_ object: [String: Any]) -> [NSString: Any] {
            Dictionary(uniqueKeysWithValues: object.map { (NSString(string: $0.key), $0.value) })
        }
        tokenizer = try AutoTokenizer.from(tokenizerConfig: Config(keyed(config)), tokenizerData: Config(keyed(tokenizerData)))
    }

    public func encode(_ text: String) -> [Int] {
        tokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(tokens: [Int]) -> String {
        tokenizer.decode(tokens: tokens)
    }

    public func token(for id: Int) -> String? {
        tokenizer.convertIdToToken(id)
    }
}
