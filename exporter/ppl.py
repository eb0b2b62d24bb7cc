"""`edgekv ppl` without a folder: perplexity of the eager model with the sink + ring cache, a plain window or
the dense cache. The parser, the folder path and the scoring are runtimes/cli_ppl.py."""

from __future__ import annotations

import argparse

import numpy as np

from exporter.config import cache_sizes
from runtimes.cli_ppl import adds_bos, read_text, read_tokens, report, stream_nll
from runtimes.errors import EdgekvError
from runtimes.manifest import load_tokenizer
from runtimes.progress import Progress


def eager_nll(ckpt, ids: list[int], sink: int, window: int, chunk: int, desc: str) -> np.ndarray:
    import torch

    from exporter.loaders import build_model

    model = build_model(ckpt, sink, window, max_chunk=chunk)

    @torch.no_grad()
    def step(tokens: list[int], pos: int) -> torch.Tensor:
        return model(torch.tensor([tokens]), torch.tensor([pos]))[0]

    return stream_nll(step, ids, chunk, desc)


def main(args: argparse.Namespace) -> int:
    from exporter.loaders import load_checkpoint

    text = read_text(args.text)
    Progress("ppl")(f"loading {args.model or 'the default model'}")
    ckpt = load_checkpoint(args.model)
    tokenizer = load_tokenizer(ckpt.tokenizer_dir)
    ids = read_tokens(tokenizer, text, args.tokens, args.text)
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
    return report(args, ids, nll, mode, sink, window, tail_from, adds_bos(tokenizer))
