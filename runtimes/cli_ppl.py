"""`edgekv ppl DIR`: stream a text through an artifact's cache and report perplexity (shows the method works).

Without a folder, `edgekv ppl` runs the eager model instead (exporter/ppl.py, which needs the export stack);
both share the parser, the text reading and the scoring here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtimes.errors import EdgekvError
from runtimes.progress import Bar
from runtimes.slots import DEFAULT_SINK, DEFAULT_WINDOW

MODES = ("sink", "window", "dense")
DEFAULT_TEXT = Path(__file__).with_name("data") / "shakespeare-excerpt.txt"  # package data: a wheel ships it


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", nargs="?", type=Path, help="an exported edgekv folder (default: run the eager model)")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score")
    p.add_argument("--model", help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--sink", type=int, help=f"sink slots S (default {DEFAULT_SINK})")
    p.add_argument(
        "--window", type=int, help=f"window slots W (default {DEFAULT_WINDOW} or the model's sliding_window)"
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="sink",
        help="sink: the contract; window: same cache with S=0; dense: unmodified model, full cache",
    )
    p.add_argument("--tokens", type=int, default=2000, help="score the first N tokens of the text (default 2000)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (exact by the contract)")
    p.add_argument("--allow-long-context", action="store_true", help="allow S + W beyond the trained context")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def read_text(path: Path, flag: str = "--text") -> str:
    """A UTF-8 text file's contents, or one line saying why it is not one: checked before any model loads."""
    if not path.is_file():
        raise EdgekvError(f"{flag} {path}: no such text file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgekvError(
            f"{flag} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it, e.g. `iconv -t UTF-8`"
        ) from None
    if "\0" in text:
        raise EdgekvError(f"{flag} {path} holds NUL bytes: a binary file, not text")
    return text


def read_tokens(tokenizer, text: str, n: int, name: object = "the text") -> list[int]:
    """The first n tokens of the text, with what the tokenizer itself adds in front (Gemma: BOS, on which its
    attention sink sits; SmolLM2: nothing)."""
    # Tokenize a prefix generous enough for n tokens rather than the whole text.
    ids = tokenizer.encode(text[: max(64, n * 16)]).ids
    if len(ids) < n:
        ids = tokenizer.encode(text).ids
    if len(ids) < 2:
        raise EdgekvError(f"{name}: need at least 2 tokens of text")
    return ids[:n]


def stream_nll(step: Callable[[list[int], int], np.ndarray], ids: list[int], chunk: int, desc: str) -> np.ndarray:
    """Negative log-likelihood of ids[i+1] given ids[..i], for i = 0..n-2, feeding chunks in order.

    `step(tokens, pos)` feeds tokens at absolute position pos and returns their logits [len, vocab]
    (any array NumPy converts, a CPU torch tensor included).
    """
    nll = np.empty(len(ids) - 1)
    with Bar(len(ids), desc) as bar:
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            logits = np.asarray(step(part, start), dtype=np.float64)
            shifted = logits - logits.max(axis=-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
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


def adds_bos(tokenizer) -> bool:
    """Does the tokenizer put a special token in front of a text (its post-processor, as transformers encodes)?"""
    return len(tokenizer.encode("a").ids) > len(tokenizer.encode("a", add_special_tokens=False).ids)


def report(
    args: argparse.Namespace,
    ids: list[int],
    nll: np.ndarray,
    mode: str,
    sink: int,
    window: int,
    tail_from: int,
    bos: bool,
) -> int:
    result = {"tokens": len(ids), "mode": mode, "sink": sink, "window": window, "bos": bos, **summarize(nll, tail_from)}
    if args.json:
        print(json.dumps(result))
    else:
        tail = result["ppl_after_fill"]
        tail_text = f", {tail:.2f} after position {tail_from}" if tail else ""
        bos_text = "BOS added by the tokenizer" if bos else "no BOS (the tokenizer adds none)"
        print(
            f"{mode}: perplexity {result['ppl']:.2f} over {len(ids)} tokens{tail_text} (S={sink}, W={window}; "
            f"{bos_text})"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    if args.artifact is None:
        raise EdgekvError("pass an artifact folder (without one, `edgekv ppl` runs the eager model: exporter/ppl.py)")
    from runtimes import open_artifact

    text = read_text(args.text)
    runner = open_artifact(args.artifact)
    ids = read_tokens(runner.tokenizer, text, args.tokens, args.text)
    nll = stream_nll(runner.feed_all_logits, ids, 1, "ppl")
    sink, window = runner.manifest["sink"], runner.manifest["window"]
    return report(args, ids, nll, "sink" if sink else "window", sink, window, sink + window, adds_bos(runner.tokenizer))
