"""Weight quantization: one scheme (`--quantize int8|int4`, `--group-size`) and one path: each weight quantized as
it is read (loaders.build_model with a target's Packer) into the form that target's converter takes as it is.

What every target does the same way:
- int8: symmetric weights, one scale per group of `group_size` consecutive input channels (on ExecuTorch
  and OpenVINO one scale per output channel, the granularity their int8 kernels take).
- int4: affine weights, a scale and a float zero point per group (min-max, llama.cpp's Q4_1 grid:
  `affine_int4`). Core ML's dequantization takes float offsets directly; ExecuTorch, ONNX and OpenVINO have
  symmetric 4-bit kernels, so each layer carries symmetric int4 weights plus a float32 offset per group,
  applied as a small product with the input's group sums (`OffsetLinear`), the same numbers. Symmetric
  int4 alone cost SmolLM2 +41 % perplexity, affine +3.6 % (benchmarks/rtn_quality.py).
- Every linear layer, the token embedding and the output projection are quantized. A tied embedding is
  quantized once for the lookup and once for the output projection where the format needs two layouts.
- The KV cache keeps the precision of the unquantized export (the contract's cache), and the manifest
  records both the scheme and the cache dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from exporter.config import ModelConfig
from runtimes.errors import EdgekvError

SCHEMES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # XNNPACK takes multiples of 32; onnxruntime powers of two from 16
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class Quantization:
    scheme: str = "none"
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.scheme)

    def describe(self, how: str = "") -> str:
        """The manifest's `weights` text for grouped weights; `how` says how the target stores int4."""
        if self.bits == 4:
            text = f"int4 affine (a scale and a float zero point per {self.group_size} input channels)"
            return f"{text}, {how}" if how else text
        return f"{self.scheme} symmetric, groups of {self.group_size}"

    def manifest(self, method: str, weights: str, activations: str, cache_dtype: str) -> dict:
        """The manifest's `quantization` entry: what was quantized, how, and with which tool."""
        group = self.group_size if self.bits else None
        return {
            "scheme": self.scheme,
            "group_size": group,
            "method": method,
            "weights": weights,
            "activations": activations,
            "cache_dtype": cache_dtype,
        }


NONE = Quantization()


def check_quantization(quant: Quantization, cfg: ModelConfig) -> None:
    """Refuse a group size that does not split every quantized row, before any work starts."""
    if quant.scheme not in SCHEMES:
        raise EdgekvError(f"unknown --quantize {quant.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not quant.bits:
        return
    widths = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_heads x head_dim": cfg.num_heads * cfg.head_dim,
    }
    bad = [f"{name} {n}" for name, n in widths.items() if n % quant.group_size]
    if bad:
        ok = [g for g in GROUP_SIZES if all(n % g == 0 for n in widths.values())]
        # Both schemes quantize in groups, so a width no group size divides rules out int8 as much as int4.
        fix = (
            f"pass --group-size {ok[0]}"
            if ok
            else f"no supported group size ({', '.join(map(str, GROUP_SIZES))}) divides them; "
            "export with --quantize none"
        )
        raise EdgekvError(f"--group-size {quant.group_size} does not divide {', '.join(bad)}; {fix}")


def block_quantize(w: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-group quantization of the rows of w [N, K], as onnxruntime's MatMulNBits quantizer does it:
    the value of largest magnitude maps to -2^(b-1), so integers in [-2^(b-1), 2^(b-1) - 1] and fp32 scales
    [N, K / group] with w ~= q * scale (exact for weights on such a grid, see exporter.quantize.split_affine)."""
    blocks = w.reshape(w.shape[0], -1, group)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    scale = extreme / -(2 ** (bits - 1))
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[..., None]), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int16)
    return q.reshape(w.shape), scale.astype(np.float32)


def by_rows(quantize, w: torch.Tensor, rows: int = 4096) -> tuple:
    """quantize(block) over blocks of rows of w, taken as float32, with the outputs (tensors or arrays) concatenated:
    a big table (a 128k-row embedding) needs one block's temporaries, not the table's, nor a float32 copy of it."""
    parts = [quantize(w[i : i + rows].float()) for i in range(0, w.shape[0], rows)]

    def join(p):
        return torch.cat(p) if isinstance(p[0], torch.Tensor) else np.concatenate(p)

    return tuple(join(p) for p in zip(*parts, strict=True))


def affine_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max affine 4-bit rounding of the rows of w [N, K] per group of `group` input channels: codes q in
    0..15 (uint8), a scale and a float zero point per group [N, K / group], w ~= scale * (q - zero). This is
    llama.cpp's Q4_1 grid (scale and minimum), so weights that came from Q4_1 with these groups return exactly."""
    blocks = w.detach().float().reshape(w.shape[0], -1, group)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, zero = -lo
    q = torch.clamp(torch.round((blocks - lo[..., None]) / scale[..., None]), 0, 15)
    return q.reshape(w.shape).to(torch.uint8), scale, -lo / scale


def affine_round_trip(w: torch.Tensor, group: int) -> torch.Tensor:
    """w as its affine int4 rounding gives it back: scale * (q - zero), per group."""
    q, scale, zero = affine_int4(w, group)
    return ((q.reshape(w.shape[0], -1, group) - zero[..., None]) * scale[..., None]).reshape(w.shape)


def split_affine(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine int4 rounding of w as symmetric int4 weights plus one offset per group:
    scale * (q - zero) = scale * (q - 8) + scale * (8 - zero). The first term lies on a symmetric grid
    (-8 .. 7) whose scale a symmetric quantizer recovers exactly (-8 * scale is always its extreme)."""
    q, scale, zero = affine_int4(w, group)
    sym = (q.reshape(w.shape[0], -1, group).float() - 8) * scale[..., None]
    return sym.reshape(w.shape), scale * (8 - zero)


class OffsetLinear(torch.nn.Module):
    """A linear layer with affine int4 weights for runtimes whose 4-bit kernels are symmetric:
    y = x @ sym.T + (sums of x over each group) @ offset.T. `linear` is quantized by the target's tool;
    `offset` ([N, K / group], 1/group of the weights) stays float32."""

    def __init__(self, linear: torch.nn.Linear, group: int):
        super().__init__()
        sym, offset = split_affine(linear.weight, group)
        self.group = group
        self.linear = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.offset = torch.nn.Linear(linear.in_features // group, linear.out_features, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(sym)
            self.offset.weight.copy_(offset)
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset(x.unflatten(-1, (-1, self.group)).sum(-1))


class OffsetEmbedding(torch.nn.Module):
    """The lookup of an affine int4 table: sym[tokens] + offset[tokens], each offset repeated over its group."""

    def __init__(self, embedding: torch.nn.Embedding, group: int):
        super().__init__()
        sym, offset = split_affine(embedding.weight, group)
        self.group = group
        self.table = torch.nn.Embedding.from_pretrained(sym, freeze=False)
        self.offset = torch.nn.Embedding.from_pretrained(offset, freeze=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        off = self.offset(tokens)
        return self.table(tokens) + off.unsqueeze(-1).expand(*off.shape, self.group).flatten(-2)
