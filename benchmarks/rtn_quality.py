"""How much round-to-nearest weight quantization alone costs SmolLM2, in the eager model (no converter).

    python benchmarks/rtn_quality.py [--tokens 2000]

Every 2-D weight (linear layers, the tied embedding) is quantized and dequantized in place, per group of 32
input channels: int8 symmetric, int4 symmetric, int4 asymmetric (integer zero point), int4 affine (float zero
point: llama.cpp's Q4_1 grid, what `edgekv export --quantize int4` writes), and the last with the (tied)
embedding left in fp32. Then the perplexity of
data/tinyshakespeare.txt is measured in sink mode with the default cache (4 + 1020), chunk 64.
This separates the cost of the scheme from that of each target's kernels (e.g. int8 activations).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.loaders import build_model, load_checkpoint  # noqa: E402
from exporter.quantize import affine_round_trip  # noqa: E402
from runtimes.cli_ppl import read_text, read_tokens, stream_nll  # noqa: E402
from runtimes.manifest import load_tokenizer  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
SCHEMES = {
    "fp32": None,
    "int8 symmetric": (8, True),
    "int4 symmetric": (4, True),
    "int4 asymmetric": (4, False),
    "int4 affine": "affine",
    "int4 affine, fp32 embedding": "affine",
}


def round_trip(w: torch.Tensor, bits: int | str, symmetric: bool = False, group: int = 32) -> torch.Tensor:
    if bits == "affine":
        return affine_round_trip(w, group)
    b = w.reshape(w.shape[0], -1, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = b.abs().amax(-1, keepdim=True).clamp(min=1e-12) / qmax
        return (torch.clamp(torch.round(b / scale), -qmax - 1, qmax) * scale).reshape(w.shape)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(b / scale) + zero, 0, 2**bits - 1) - zero) * scale).reshape(w.shape)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2000)
    args = p.parse_args()
    ckpt = load_checkpoint()
    ids = read_tokens(load_tokenizer(ckpt.tokenizer_dir), read_text(TEXT), args.tokens)
    base = None
    for name, scheme in SCHEMES.items():
        model = build_model(ckpt, 4, 1020, max_chunk=64)
        with torch.no_grad():
            for pname, w in model.named_parameters():  # a tied table is one parameter: the embedding's
                if scheme and w.ndim == 2 and not (name.endswith("fp32 embedding") and "embed" in pname):
                    w.copy_(round_trip(w, *scheme) if isinstance(scheme, tuple) else round_trip(w, scheme))

        @torch.no_grad()
        def step(tokens, pos, model=model):
            return model(torch.tensor([tokens]), torch.tensor([pos]))[0]

        ppl = math.exp(float(stream_nll(step, ids, 64, name).mean()))
        base = base or ppl
        print(f"{name:<28} perplexity {ppl:.3f}  ({100 * (ppl / base - 1):+.1f}% vs fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
