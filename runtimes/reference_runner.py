"""The eager reference behind the runner interface, so it streams and generates like an artifact."""

from __future__ import annotations

import numpy as np
import torch

from exporter.reference import Reference
from runtimes import Runner


class ReferenceRunner(Runner):
    def __init__(self, model, tokenizer, chunk: int = 1):
        self.ref = Reference(model)
        self.tokenizer, self.chunk, self.vocab_size = tokenizer, chunk, model.cfg.vocab_size
        self.token_dtype, self.manifest, self.pos = np.int64, None, 0

    def reset(self) -> None:
        super().reset()
        self.ref.reset()

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        with torch.no_grad():
            for t in tokens[0]:
                logits = self.ref.feed(int(t))
        return logits.numpy()
