"""OpenVINO: the ONNX graph converted to IR, the cache an input it only reads and the chunk's new entries an
output the runtime writes into their slots (as for ONNX).

Not stateful: made stateful (ReadValue/Assign), the graph must produce the whole next cache, and the CPU
plugin's scatter into it measured 106 ms/token for SmolLM2 at 1,024 slots against 27 ms for this form."""

from __future__ import annotations

import tempfile
from pathlib import Path

from exporter.model import StreamingLM
from exporter.quantize import Quantization
from exporter.targets import ExportSpec, require

# The Packer's: the ONNX form, which the ONNX frontend reads as compressed weights. A tied table is packed twice: the
# frontend takes GatherBlockQuantized's data only as a constant, not as a reshape of MatMulNBits' weights.
from exporter.targets.nbits import pack  # noqa: F401
from exporter.targets.onnx import pure_io, write_onnx


def packed_manifest(quant: Quantization) -> dict:
    return quant.manifest(
        "MatMulNBits / GatherBlockQuantized (written as each weight was read), read by OpenVINO's "
        "ONNX frontend as compressed weights",
        quant.describe("stored as symmetric int4 + float16 offsets"),
        "float32 (the CPU plugin may compute int8 products)",
        "float32",
    )


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    ov = require("openvino", "openvino")
    quant = spec.quant
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        write_onnx(model, onnx_path, spec.chunk, spec.identity)
        spec.log("converted to ONNX")
        if spec.owned:  # its weights are in the ONNX file now: freed before OpenVINO reads that file
            model.to("meta")
        # read_model maps the ONNX file's external weights rather than copying them (1B fp32: 4.9 GB peak
        # against convert_model's 8.7 GB); the IR is saved while the file is still there.
        ir = ov.Core().read_model(str(onnx_path))
        ir.set_rt_info(spec.identity, ["edgekv"])  # read by the runner
        ov.save_model(ir, str(out_dir / "model.xml"), compress_to_fp16=False)  # keep fp32 weights
        del ir
    spec.log("converted to OpenVINO IR")
    return {
        "files": {"model": "model.xml", "weights": "model.bin"},
        "entries": {"decode": "model.xml (T=1)", "prefill": f"model.xml (T={spec.chunk})"},
        **pure_io(model),
        "compute_precision": "float32",
        "quantization": packed_manifest(quant)
        if quant.bits
        else quant.manifest("none", "float32", "float32", "float32"),
    }
