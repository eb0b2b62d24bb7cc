import Foundation

public struct ChatMessage: Equatable, Sendable, Identifiable {
    public enum Role: String, Sendable {
        case system
        case user
        case assistant
    }

    public let id: Int
    public let role: Role
    public var content: String

    public init(id: Int, role: Role, content: String) {
        self.id = id
        self.role = role
        self.content = content
    }
}

/// Renders a conversation with the model's chat template (the app uses swift-jinja; tests use a
/// template written in Swift).
public protocol ChatRendering {
    func render(_ messages: [ChatMessage], addGenerationPrompt: Bool) throws -> String
}

/// Multi-turn chat as one continuous token stream, the algorithm of `Chat` in runtimes/chat.py.
///
/// Each turn renders the whole conversation and feeds only the text the stream does not hold yet,
/// so the conversation lives in the fixed sink + ring cache however long it goes on. After a reply
/// the stream holds the rendering up to the end of the answer; the template's closing text
/// (end-of-turn token, separator) is fed at the start of the next turn.
public struct ChatTranscript {
    public private(set) var messages: [ChatMessage] = []
    /// The rendered conversation text whose tokens the stream already holds.
    public private(set) var inStream = ""
    private var nextID = 0

    public init(system: String? = nil) {
        if let system {
            append(.system, system)
        }
    }

    /// A conversation resumed from a session: its messages and the rendered text its stream holds.
    public init(messages: [ChatMessage], inStream: String) {
        self.messages = messages
        self.inStream = inStream
        nextID = (messages.map(\.id).max() ?? -1) + 1
    }

    private mutating func append(_ role: ChatMessage.Role, _ content: String) {
        messages.append(ChatMessage(id: nextID, role: role, content: content))
        nextID += 1
    }

    /// Adds the user's turn and returns the text to feed before generating the reply.
    public mutating func prompt(user: String, renderer: ChatRendering) throws -> String {
        append(.user, user)
        let full = try renderer.render(messages, addGenerationPrompt: true)
        // Templates are append-only for the supported families; if one re-renders history,
        // continue from where the two renderings agree rather than restarting the stream.
        let agree = full.hasPrefix(inStream) ? inStream.count : commonPrefixLength(full, inStream)
        let fresh = String(full.dropFirst(agree))
        inStream = full
        return fresh
    }

    /// Records the assistant's reply once generation has stopped (end token, limit or Stop button).
    public mutating func finish(answer: String, renderer: ChatRendering) throws {
        append(.assistant, answer)
        let rendered = try renderer.render(messages, addGenerationPrompt: false)
        for said in [answer, answer.trimmingWhitespace()] where !said.isEmpty {
            if let range = rendered.range(of: said, options: .backwards) {
                inStream = String(rendered[..<range.upperBound])
                return
            }
        }
    }
}

func commonPrefixLength(_ a: String, _ b: String) -> Int {
    var n = 0
    for (x, y) in zip(a, b) {
        guard x == y else { break }
        n += 1
    }
    return n
}

extension String {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c.isWhitespace { s = s.dropFirst() }
        while let c = s.last, c.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}
