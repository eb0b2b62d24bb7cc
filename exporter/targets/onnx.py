"""ONNX: one graph with a dynamic token count (1 = decode, up to `chunk` = prefill). The cache is explicit
inputs the graph only reads (`key_cache.i`, `value_cache.i`, [KV, C, D] each); the graph outputs the chunk's
new cache entries, which the runtime writes into their slots in place (slot_of(input_pos + t), the later
entry winning where a chunk longer than the ring repeats a slot): per token one slot per layer is written,
and the cache is never copied."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.model import StreamingLM
from exporter.targets import ExportSpec, io_entry, require
from exporter.targets.compat import onnx as compat
from exporter.targets.nbits import pack, pack_tied, translations  # noqa: F401 (pack, pack_tied: the Packer's)


class PureStep(torch.nn.Module):
    """The model in its pure form: (tokens, input_pos, 2L caches [KV, C, D]) -> (logits, kv_update), the chunk's
    cache entries [2, L, KV, T, D]. One input per layer and half: onnxruntime copies every slice it takes of a
    tensor, so a stacked cache input cost a copy of the whole cache a token (profiled: a Split of 4 ms)."""

    def __init__(self, model: StreamingLM):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches):
        logits, entries = self.model.step(tokens, input_pos, caches)
        return logits, self.model.stacked(entries)


def cache_names(model: StreamingLM) -> list[str]:
    n = model.cfg.num_layers
    return [f"{half}_cache.{i}" for half in ("key", "value") for i in range(n)]


def write_onnx(model: StreamingLM, path: Path, chunk: int, identity: str) -> None:
    require("onnxscript", "onnxscript")
    t = torch.export.Dim("T", min=1, max=chunk)
    caches = [c.clone() for c in model.caches()]
    args = (torch.zeros(1, chunk, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), caches)
    # torch.onnx.export's graphs outlive it with copies of the weights: their data is dropped once the file is written
    # (exporter/targets/compat/onnx.py).
    with compat.hooks(), torch.no_grad():
        program = torch.onnx.export(
            PureStep(model).eval(),
            args,
            dynamo=True,
            verbose=False,
            input_names=["tokens", "input_pos", *cache_names(model)],
            output_names=["logits", "kv_update"],
            dynamic_shapes={"tokens": {1: t}, "input_pos": None, "caches": [None] * len(caches)},
            custom_translation_table=translations(),
        )
        program.model.metadata_props["edgekv"] = identity  # read by the runner
        # Weights past 64 MB go to a side file, written a tensor at a time (inside the protobuf, saving held two more
        # copies of them; and protobuf stops at 2 GB).
        big = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) > 64e6
        program.save(str(path), external_data=big)
        del program


def pure_io(model: StreamingLM) -> dict:
    """Manifest tensors of the pure graph (ONNX, OpenVINO): the cache goes in, the chunk's entries come out."""
    cache = list(model.kv_cache.shape)
    parts = zip(cache_names(model), model.caches(), strict=True)  # each layer's own S + W slots
    return {
        "inputs": [
            io_entry("tokens", "tokens", "int64", [1, "T"]),
            io_entry("position", "input_pos", "int64", [1]),
            *(io_entry("cache", name, "float32", list(part.shape)) for name, part in parts),
        ],
        "outputs": [
            io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size]),
            io_entry("cache_update", "kv_update", "float32", cache[:3] + ["T"] + cache[4:]),
        ],
        "state": [],
    }


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    quant = spec.quant
    write_onnx(model, out_dir / "model.onnx", spec.chunk, spec.identity)
    spec.log("converted to ONNX")
    files = {"model": "model.onnx"}
    if (out_dir / "model.onnx.data").exists():
        files["external_data"] = "model.onnx.data"
    return {
        "files": files,
        "entries": {"decode": "model.onnx (T=1)", "prefill": f"model.onnx (T={spec.chunk})"},
        **pure_io(model),
        "compute_precision": "float32",
        "quantization": quant.manifest(
            "MatMulNBits (accuracy level 4) + GatherBlockQuantized, written as each weight was read"
            if quant.bits
            else "none",
            quant.describe("stored as symmetric int4 + float16 offsets") if quant.bits else "float32",
            "int8 per block in the products" if quant.bits else "float32",
            "float32",
        ),
    }
