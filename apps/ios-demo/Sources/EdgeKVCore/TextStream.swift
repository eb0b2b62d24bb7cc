/// Turns token ids back into text, implemented by the app over swift-transformers' tokenizer.
public protocol TokenDecoding {
    func decode(tokens: [Int]) -> String
}

/// Incremental detokenization for a chat view that grows token by token, in constant memory.
///
/// Re-decodes only the last few tokens and emits text once it is settled (not ending in an
/// incomplete UTF-8 sequence, which decodes to U+FFFD), the prefix/read-offset scheme of vLLM and
/// TGI; the same algorithm as `TextStream` in runtimes/generate.py.
public struct TextStream {
    private var ids: [Int] = []
    private var read = 0  // ids[..<read] were already emitted; they give the next decode its context

    public init() {}

    public mutating func push(_ token: Int, decoder: TokenDecoding) -> String {
        ids.append(token)
        // Unicode scalars, not Characters: a combining mark may join the previous character.
        let before = decoder.decode(tokens: Array(ids[..<read])).unicodeScalars
        let text = decoder.decode(tokens: ids).unicodeScalars
        if text.count <= before.count || text.last == "\u{FFFD}" {
            return ""
        }
        ids = Array(ids[read...])
        read = ids.count
        var piece = ""
        piece.unicodeScalars.append(contentsOf: text.dropFirst(before.count))
        return piece
    }
}
