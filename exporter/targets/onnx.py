"""ONNX: one graph with a dynamic token count (1 = decode, up to `chunk` = prefill); the cache is
an explicit input/output pair, which runtimes keep in place between calls."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.model import StreamingLM
from exporter.targets import ExportSpec, io_entry, require


class PureStep(torch.nn.Module):
    """The same model in its pure form: (tokens, input_pos, kv_cache) -> (logits, kv_cache_out)."""

    def __init__(self, model: StreamingLM):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, kv_cache):
        return self.model.step(tokens, input_pos, kv_cache)


def write_onnx(model: StreamingLM, path: Path, chunk: int) -> None:
    require("onnxscript", "onnxscript")
    t = torch.export.Dim("T", min=1, max=chunk)
    args = (torch.zeros(1, chunk, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), model.kv_cache.clone())
    with torch.no_grad():
        program = torch.onnx.export(
            PureStep(model), args, dynamo=True, verbose=False,
            input_names=["tokens", "input_pos", "kv_cache"], output_names=["logits", "kv_cache_out"],
            dynamic_shapes={"tokens": {1: t}, "input_pos": None, "kv_cache": None},
        )
    # Weights go to a side file past protobuf's 2 GB limit.
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    program.save(str(path), external_data=big)


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    write_onnx(model, out_dir / "model.onnx", spec.chunk)
    spec.log("converted to ONNX")
    files = {"model": "model.onnx"}
    if (out_dir / "model.onnx.data").exists():
        files["external_data"] = "model.onnx.data"
    cache = list(model.kv_cache.shape)
    return {
        "files": files,
        "entries": {"decode": "model.onnx (T=1)", "prefill": f"model.onnx (T={spec.chunk})"},
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1]),
                   io_entry("cache", "kv_cache", "float32", cache)],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size]),
                    io_entry("cache", "kv_cache_out", "float32", cache)],
        "state": [],
        "compute_precision": "float32",
    }
