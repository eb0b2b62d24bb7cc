"""Weight quantization: one scheme (`--quantize int8|int4`, `--group-size`), applied by each target's own tool.

What every target does the same way:
- Symmetric integer weights (no zero points), one scale per group of `group_size` consecutive input
  channels (int8 on ExecuTorch and OpenVINO: one scale per output channel, the granularity their int8
  kernels take).
- Every linear layer, the token embedding and the output projection are quantized. A tied embedding is
  quantized once for the lookup and once for the output projection where the format needs two layouts.
- The KV cache keeps the precision of the unquantized export (the contract's cache), and the manifest
  records both the scheme and the cache dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from exporter.config import EdgekvError, ModelConfig

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

    def manifest(self, method: str, weights: str, activations: str, cache_dtype: str, grouped: bool = True) -> dict:
        """The manifest's `quantization` entry: what was quantized, how, and with which tool."""
        group = self.group_size if self.bits and grouped else None
        return {"scheme": self.scheme, "group_size": group, "method": method,
                "weights": weights, "activations": activations, "cache_dtype": cache_dtype}


NONE = Quantization()


def check_quantization(quant: Quantization, cfg: ModelConfig) -> None:
    """Refuse a group size that does not split every quantized row, before any work starts."""
    if quant.scheme not in SCHEMES:
        raise EdgekvError(f"unknown --quantize {quant.scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not quant.bits:
        return
    widths = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_heads x head_dim": cfg.num_heads * cfg.head_dim}
    bad = [f"{name} {n}" for name, n in widths.items() if n % quant.group_size]
    if bad:
        ok = [g for g in GROUP_SIZES if all(n % g == 0 for n in widths.values())]
        fix = f"pass --group-size {ok[0]}" if ok else "this model's widths fit no supported group size; use int8"
        raise EdgekvError(f"--group-size {quant.group_size} does not divide {', '.join(bad)}; {fix}")


def untied(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose output projection owns its weight: the lookup and the projection quantize separately."""
    model = copy.deepcopy(model)
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.detach().clone())
    return model
