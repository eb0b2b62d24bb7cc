"""Multi-turn chat through one continuous stream: each turn feeds only the text the chat template
adds, so the whole conversation lives in the fixed sink + ring cache for as long as it goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from runtimes.errors import EdgekvError
from runtimes.generate import TextStream, generate


class ChatTemplate:
    """The model's Jinja chat template, rendered the way transformers renders it (sandboxed)."""

    def __init__(self, folder: Path):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        cfg_file = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        source = (
            (folder / "chat_template.jinja").read_text()
            if (folder / "chat_template.jinja").is_file()
            else cfg.get("chat_template")
        )
        if not isinstance(source, str):
            raise EdgekvError(f"{folder} has no chat template (chat_template.jinja); use `edgekv generate`")

        def raise_exception(message):
            raise EdgekvError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.tokens = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)


def _token_text(tok) -> str:
    return tok.get("content", "") if isinstance(tok, dict) else tok or ""


class Chat:
    """One conversation over one runner. `reply()` streams the assistant's text piece by piece."""

    def __init__(self, runner, template: ChatTemplate, system: str | None = None, **sampling):
        self.runner, self.template, self.sampling = runner, template, sampling
        self.messages = [{"role": "system", "content": system}] if system else []
        self.in_stream = ""  # the rendered conversation text whose tokens the stream already holds
        eos = runner.manifest["special_tokens"]["eos"] if runner.manifest else None
        self.stop = {eos} if eos is not None else set()
        self.last_tokens: list[int] = []
        self.last_prompt = 0

    def reply(self, user: str, max_tokens: int) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user})
        full = self.template.render(self.messages, add_generation_prompt=True)
        # Templates are append-only for the families edgekv supports; if one re-renders history,
        # continue from where the two renderings agree rather than restarting the stream.
        agree = len(self.in_stream) if full.startswith(self.in_stream) else _common_prefix(full, self.in_stream)
        prompt = self.runner.tokenizer.encode(full[agree:], add_special_tokens=False).ids
        text, stream, self.last_tokens, self.last_prompt = [], TextStream(self.runner.tokenizer), [], len(prompt)
        sampling = dict(self.sampling)
        if sampling.get("seed") is not None:  # reproducible, but not the same draws every turn
            sampling["seed"] += len(self.messages)
        for token in generate(self.runner, prompt, max_tokens, stop=self.stop, **sampling):
            self.last_tokens.append(token)
            if token in self.stop:
                break
            piece = stream.push(token)
            text.append(piece)
            yield piece
        answer = "".join(text)
        self.messages.append({"role": "assistant", "content": answer})
        # The stream now holds the rendering up to the end of the answer; the template's closing
        # text (end-of-turn token and separator) is fed with the next turn.
        rendered = self.template.render(self.messages, add_generation_prompt=False)
        self.in_stream = full
        for said in (answer, answer.strip()):
            if said and (at := rendered.rfind(said)) >= 0:
                self.in_stream = rendered[: at + len(said)]
                break


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
