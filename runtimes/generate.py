"""The one generation loop every runner shares: prompt through the chunk entry, then decode."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def sample(
    logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0
) -> int:
    """Greedy when temperature is 0; otherwise temperature, then top-k, then top-p (nucleus) sampling."""
    if temperature <= 0 or rng is None:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # smallest prefix whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate(
    runner,
    prompt: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: set[int] | None = None,
) -> Iterator[int]:
    """Yield new tokens. The stream continues from the runner's position (multi-turn chat keeps one
    stream); max_tokens 0 means no limit: the ring wraps as often as needed in fixed memory."""
    rng = np.random.default_rng(seed) if temperature > 0 else None
    logits = runner.feed(prompt)
    produced = 0
    while max_tokens <= 0 or produced < max_tokens:
        token = sample(logits, rng, temperature, top_k, top_p)
        produced += 1
        yield token
        if stop and token in stop:
            return
        logits = runner.feed([token])


class TextStream:
    """Incremental detokenization for streaming output in constant memory.

    Re-decodes only the last few tokens and emits text once it is settled (not ending in an incomplete
    UTF-8 sequence), the prefix/read-offset scheme of vLLM and TGI. Keeps O(recent tokens) state.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is already emitted context for the next decode

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.ids, self.read = self.ids[self.read :], len(self.ids) - self.read
        self.prefix = 0
        return text[len(before) :]
