"""ExecuTorch: one .pte with `decode` and `prefill` methods lowered to XNNPACK, sharing the cache buffer."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.model import StreamingLM
from exporter.quantize import Quantization, untied
from exporter.targets import ExportSpec, io_entry, require, trace


def quantize(model: StreamingLM, quant: Quantization) -> StreamingLM:
    """torchao on an untied copy. Linear layers: int8 dynamic activations x int4 weights in groups (8da4w) or
    int8 weights per output channel (8da8w), the forms XNNPACK runs. Embedding: int4/int8 weights in groups,
    fused at to_executorch into quantized_decomposed::embedding_{4bit,byte} (the runtime needs
    ExecuTorch's quantized kernels: `import executorch.kernels.quantized` in Python)."""
    require("torchao", "torchao==0.18.0")
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    model = untied(model)
    dtype = getattr(torch, quant.scheme)
    linear = PerGroup(quant.group_size) if quant.bits == 4 else PerAxis(0)
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=linear),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Linear))
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(quant.group_size)),
              filter_fn=lambda m, _: isinstance(m, torch.nn.Embedding))
    return model


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    exir = require("executorch.exir", "executorch==1.5.1")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch==1.5.1")
    from executorch.exir.passes import MemoryPlanningPass

    quant = spec.quant
    if quant.bits:
        model = quantize(model, quant)
        spec.log(f"quantized weights to {quant.scheme} with torchao")
    programs = {"decode": trace(model, 1), "prefill": trace(model, spec.chunk)}
    spec.log("traced decode and prefill")
    edge = exir.to_edge_transform_and_lower(programs, partitioner=[xnn.XnnpackPartitioner()])
    spec.log("lowered to XNNPACK")
    # share_mutable_buffers: both methods read and write one kv_cache allocation.
    config = exir.ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
        do_quant_fusion_and_const_prop=bool(quant.bits),  # dequantize + embedding -> quantized embedding op
    )
    program = edge.to_executorch(config)
    (out_dir / "model.pte").write_bytes(program.buffer)
    return {
        "files": {"model": "model.pte"},
        "entries": {"decode": "decode", "prefill": "prefill"},
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1])],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size])],
        "state": [io_entry("cache", "kv_cache", "float32", list(model.kv_cache.shape))],
        "compute_precision": "float32",
        "quantization": quant.manifest(
            f"torchao Int8DynamicActivationIntxWeightConfig ({quant.scheme}) + XNNPACK" if quant.bits else "none",
            {"int4": f"int4 symmetric, groups of {quant.group_size}",
             "int8": f"int8 symmetric per output channel (embedding: groups of {quant.group_size})",
             }.get(quant.scheme, "float32"),
            "int8 dynamic, per token" if quant.bits else "float32", "float32"),
    }
