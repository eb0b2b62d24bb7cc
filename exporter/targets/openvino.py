"""OpenVINO: the ONNX graph converted to IR and made stateful (the cache becomes ReadValue/Assign)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from exporter.model import StreamingLM
from exporter.targets import ExportSpec, io_entry, require
from exporter.targets.onnx import write_onnx


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    ov = require("openvino", "openvino")
    from openvino._offline_transformations import apply_make_stateful_transformation

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(model, onnx_path, spec.chunk)
        spec.log("converted to ONNX")
        ir = ov.convert_model(str(onnx_path))
    apply_make_stateful_transformation(ir, {"kv_cache": "kv_cache_out"})
    ov.save_model(ir, str(out_dir / "model.xml"), compress_to_fp16=False)  # keep fp32 weights
    spec.log("converted to OpenVINO IR (stateful)")
    return {
        "files": {"model": "model.xml", "weights": "model.bin"},
        "entries": {"decode": "model.xml (T=1)", "prefill": f"model.xml (T={spec.chunk})"},
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1])],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size])],
        "state": [io_entry("cache", "kv_cachekv_cache_out", "float32", list(model.kv_cache.shape))],
        "compute_precision": "float32",
    }
