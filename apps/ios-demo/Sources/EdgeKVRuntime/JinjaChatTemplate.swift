import EdgeKVCore
import Foundation
import Jinja

public enum ChatTemplateError: Error, LocalizedError {
    case missing

    public var errorDescription: String? {
        "this model has no chat template (chat_template.jinja); export an instruct model"
    }
}

/// The model's own Jinja chat template, rendered the way transformers renders it
/// (trim_blocks and lstrip_blocks on, bos/eos token text in the context).
public struct JinjaChatTemplate: ChatRendering {
    private let template: Template
    private let specialTokens: [String: Value]

    public init(folder: ModelFolder, tokenizer: HFTokenizer) throws {
        guard let source = try folder.chatTemplateSource() else { throw ChatTemplateError.missing }
        template = try Template(source, with: Template.Options(lstripBlocks: true, trimBlocks: true))
        var tokens: [String: Value] = [:]
        for (name, id) in folder.manifest.specialTokens.templateNames {
            if let text = tokenizer.token(for: id) {
                tokens[name] = try Value(any: text)
            }
        }
        specialTokens = tokens
    }

    public func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) throws -> String {
        var context = specialTokens
        context["messages"] = try Value(any: messages.map { ["role": $0.role.rawValue, "content": $0.content] })
        context["add_generation_prompt"] = try Value(any: addGenerationPrompt)
        return try template.render(context)
    }
}
