/// swift-transformers picks its tokenizer implementation from `tokenizer_class` in
/// tokenizer_config.json. transformers 5 writes "TokenizersBackend" there, which it does not know;
/// the tokenizer.json model type says what is meant (BPE for Llama, Mistral, Qwen2 and SmolLM2).
public enum TokenizerClass {
    /// Classes swift-transformers (1.x) maps to an implementation, without their "Fast" suffix.
    public static let known: Set<String> = [
        "BertTokenizer", "DistilbertTokenizer", "DistilBertTokenizer", "RobertaTokenizer", "CodeGenTokenizer",
        "CodeLlamaTokenizer", "FalconTokenizer", "GemmaTokenizer", "GPT2Tokenizer", "LlamaTokenizer",
        "T5Tokenizer", "WhisperTokenizer", "CohereTokenizer", "Qwen2Tokenizer", "PreTrainedTokenizer",
    ]

    /// The class to ask swift-transformers for, or nil when neither name nor model type is usable.
    public static func resolve(declared: String?, modelType: String?) -> String? {
        if let declared {
            let name = declared.hasSuffix("Fast") ? String(declared.dropLast(4)) : declared
            if known.contains(name) { return name }
        }
        switch modelType {
        case "BPE": return "GPT2Tokenizer"
        case "Unigram": return "T5Tokenizer"
        case "WordPiece": return "BertTokenizer"
        default: return nil
        }
    }
}
