import EdgeKVCore
import EdgeKVRuntime
import Foundation

/// Everything one conversation needs, used from one generation task at a time: the Core ML model
/// and its fixed cache, the tokenizer, the chat template and the transcript.
final class ChatEngine {
    let folder: ModelFolder
    private let tokenizer: HFTokenizer
    private let template: JinjaChatTemplate
    private let stream: TokenStream
    private let stop: Set<Int>
    private var transcript: ChatTranscript

    static func load(folder url: URL) async throws -> ChatEngine {
        let folder = try ModelFolder(url: url)
        let compiled = try await folder.compiledModel()
        let model = try CoreMLModel(compiledURL: compiled, manifest: folder.manifest)
        return try ChatEngine(folder: folder, model: model)
    }

    private init(folder: ModelFolder, model: CoreMLModel) throws {
        self.folder = folder
        tokenizer = try HFTokenizer(folder: folder)
        template = try JinjaChatTemplate(folder: folder, tokenizer: tokenizer)
        stream = TokenStream(model: model, geometry: folder.manifest.geometry)
        stop = Set([folder.manifest.specialTokens.eos].compactMap { $0 })
        transcript = ChatTranscript()
    }

    var capacity: Int { stream.geometry.capacity }
    var position: Int { stream.position }

    func newChat() throws {
        try stream.reset()
        transcript = ChatTranscript()
    }

    /// Streams the reply to `user` piece by piece; returns when the model ends its turn, the limit is
    /// reached or the task is cancelled (the Stop button). The stream continues in the next turn.
    func reply(to user: String, settings: SamplingSettings, onPiece: (String, StreamStatus) -> Void) throws {
        let prompt = tokenizer.encode(try transcript.prompt(user: user, renderer: template))
        var text = TextStream()
        var answer = ""
        var count = 0
        var started = Date()
        try stream.generate(prompt: prompt, settings: settings, stop: stop,
                            shouldStop: { Task.isCancelled }) { token in
            if count == 0 { started = Date() }  // time decode only, not the prompt
            count += 1
            guard !stop.contains(token) else { return }
            let piece = text.push(token, decoder: tokenizer)
            answer += piece
            let seconds = Date().timeIntervalSince(started)
            let status = StreamStatus(tokensPerSecond: count > 1 && seconds > 0 ? Double(count - 1) / seconds : 0,
                                      position: stream.position, capacity: capacity,
                                      footprintBytes: memoryFootprintBytes())
            onPiece(piece, status)
        }
        try transcript.finish(answer: answer, renderer: template)
    }
}
