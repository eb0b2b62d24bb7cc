"""One file per target, each with `export(model, out_dir, spec) -> dict` (the manifest's model entries).

Backends are imported inside the function that needs them, so a missing one names its package.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch

from exporter.model import StreamingLM
from exporter.quantize import NONE, Quantization
from runtimes.errors import EdgekvError

TARGETS = {
    "executorch": "exporter.targets.executorch",
    "coreml": "exporter.targets.coreml",
    "onnx": "exporter.targets.onnx",
    "openvino": "exporter.targets.openvino",
}


@dataclass
class ExportSpec:
    chunk: int  # tokens per prefill call
    log: callable = print  # progress lines ("trace", "lower", ...) go here
    quant: Quantization = NONE  # weight quantization (exporter/quantize.py)
    identity: str = ""  # recorded inside the model file under "edgekv" (runtimes.manifest.identity)
    owned: bool = False  # the model is this export's alone: its weights may be freed once written


class Packer:
    """How a quantized export holds each linear layer and the embedding from the moment its weights are read
    (loaders.build_model): the target's `pack(module, quant)` form, the one its converter takes as it is, so the
    float model never exists. A tied embedding and output projection go to the target's `pack_tied` if it has one
    (stored once), else are packed separately."""

    def __init__(self, target: str, quant: Quantization):
        self.target, self.quant = target_module(target), quant

    def __call__(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.target.pack(module, self.quant)

    def tied(self, embedding: torch.nn.Embedding, head: torch.nn.Linear) -> tuple[torch.nn.Module, torch.nn.Module]:
        if hasattr(self.target, "pack_tied"):
            return self.target.pack_tied(embedding, head, self.quant)
        return self(embedding), self(head)


def pack_model(model: StreamingLM, pack: Packer) -> StreamingLM:
    """A copy of a loaded float model with its linear layers and embedding in the target's packed form, the one
    quantization path: what loaders.build_model does as each weight is read, for a model already in memory."""
    model = copy.deepcopy(model)
    tied = model.cfg.tie_word_embeddings
    for name, module in list(model.named_modules()):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and not (
            tied and name in ("embed_tokens", "lm_head")
        ):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, pack(module))
    if tied:
        model.embed_tokens, model.lm_head = pack.tied(model.embed_tokens, model.lm_head)
    model.packed = pack.quant
    return model


def target_module(name: str):
    if name not in TARGETS:
        raise EdgekvError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)} or all")
    return importlib.import_module(TARGETS[name])


def require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgekvError(f"{module} is not installed ({e}); pip install '{package}'") from None


def trace(model: StreamingLM, tokens: int, token_dtype: torch.dtype = torch.int64) -> torch.export.ExportedProgram:
    """torch.export of the stateful model for a fixed number of tokens per call (1 = decode)."""
    args = (torch.zeros(1, tokens, dtype=token_dtype), torch.zeros(1, dtype=token_dtype))
    with torch.no_grad():  # buffer mutation fails on a graph that records gradients
        return torch.export.export(model, args, strict=False)


# cache_update: a chunk's new cache entries [2, L, KV, T, D], which the caller writes into the cache input at
# slots slot_of(position + t) (ONNX, whose graphs cannot update an input in place).
ROLES = ("tokens", "position", "logits", "cache", "cache_update")


def io_entry(role: str, name: str, dtype: str, shape: list) -> dict:
    """One manifest tensor. `role` says what it is for, so no runtime (nor the iOS app) goes by name or order."""
    assert role in ROLES, role
    return {"role": role, "name": name, "dtype": dtype, "shape": shape}
