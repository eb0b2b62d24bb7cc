"""`edgekv ppl`: stream a text through the cache and report perplexity (shows the method works)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from exporter.config import EdgekvError, cache_sizes

MODES = ("sink", "window", "dense")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="?", type=Path, help="an exported edgekv folder (default: run the eager model)")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    p.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--sink", type=int, help="sink slots S (default 4)")
    p.add_argument("--window", type=int, help="window slots W (default 1020 or the model's sliding_window)")
    p.add_argument("--mode", choices=MODES, default="sink",
                   help="sink: the contract; window: same cache with S=0; dense: unmodified model, full cache")
    p.add_argument("--tokens", type=int, default=2000, help="score the first N tokens of the text (default 2000)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (exact by the contract)")
    p.add_argument("--allow-long-context", action="store_true", help="allow S + W beyond the trained context")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def read_tokens(tokenizer, text_file: Path, n: int) -> list[int]:
    if not text_file.is_file():
        raise EdgekvError(f"{text_file}: no such text file")
    # Tokenize a prefix generous enough for n tokens rather than the whole file.
    text = text_file.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(text[: max(64, n * 16)], add_special_tokens=False).ids
    if len(ids) < n:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < 2:
        raise EdgekvError(f"{text_file}: need at least 2 tokens of text")
    return ids[:n]


def stream_nll(step: Callable[[list[int], int], np.ndarray], ids: list[int], chunk: int, desc: str) -> np.ndarray:
    """Negative log-likelihood of ids[i+1] given ids[..i], for i = 0..n-2, feeding chunks in order.

    `step(tokens, pos)` feeds tokens at absolute position pos and returns their logits [len, vocab].
    """
    nll = np.empty(len(ids) - 1)
    with tqdm(total=len(ids), desc=desc, unit="tok", file=sys.stderr, disable=None, leave=False) as bar:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            logits = torch.as_tensor(step(part, start), dtype=torch.float64)
            logp = torch.log_softmax(logits, dim=-1)
            for i in range(len(part)):
                if start + i + 1 < len(ids):
                    nll[start + i] = -float(logp[i, ids[start + i + 1]])
            bar.update(len(part))
    return nll


def summarize(nll: np.ndarray, tail_from: int) -> dict:
    """Perplexity over all predictions and over those made at positions >= tail_from."""
    tail = nll[tail_from:]
    return {
        "ppl": math.exp(float(nll.mean())),
        "ppl_after_fill": math.exp(float(tail.mean())) if len(tail) else None,
    }


def eager_nll(ckpt, ids: list[int], sink: int, window: int, chunk: int, desc: str) -> np.ndarray:
    from exporter.loaders import build_model

    model = build_model(ckpt, sink, window, max_chunk=chunk)

    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        return model(torch.tensor([tokens]), torch.tensor([pos]))[0]

    return stream_nll(step, ids, chunk, desc)


def main(args: argparse.Namespace) -> int:
    if args.artifact is not None:
        from runtimes import open_artifact

        runner = open_artifact(args.artifact)
        ids = read_tokens(runner.tokenizer, args.text, args.tokens)
        nll = stream_nll(runner.feed_all_logits, ids, 1, "ppl")
        sink, window = runner.manifest["sink"], runner.manifest["window"]
        mode, tail_from = ("sink" if sink else "window"), sink + window
    else:
        from exporter.loaders import load_checkpoint, load_tokenizer

        ckpt = load_checkpoint(args.model)
        ids = read_tokens(load_tokenizer(ckpt.tokenizer_dir), args.text, args.tokens)
        sink, window = cache_sizes(ckpt.config, args.sink, args.window, args.allow_long_context)
        mode = args.mode
        if mode == "dense" and len(ids) > ckpt.config.max_position_embeddings and not args.allow_long_context:
            raise EdgekvError(
                f"dense mode over {len(ids)} tokens exceeds the trained context "
                f"({ckpt.config.max_position_embeddings}); lower --tokens"
            )
        sink, window = {"sink": (sink, window), "window": (0, window), "dense": (0, len(ids))}[mode]
        # "after fill" counts predictions once the ring is full; dense uses the S + W it would have had.
        tail_from = sink + window if mode != "dense" else sum(cache_sizes(ckpt.config, args.sink, args.window, True))
        nll = eager_nll(ckpt, ids, sink, window, chunk=args.chunk, desc=f"ppl {mode}")
    result = {"tokens": len(ids), "mode": mode, "sink": sink, "window": window, **summarize(nll, tail_from)}
    if args.json:
        print(json.dumps(result))
    else:
        tail = result["ppl_after_fill"]
        tail_text = f", {tail:.2f} after position {tail_from}" if tail else ""
        print(f"{mode}: perplexity {result['ppl']:.2f} over {len(ids)} tokens{tail_text} (S={sink}, W={window})")
    return 0
