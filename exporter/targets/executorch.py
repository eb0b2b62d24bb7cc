"""ExecuTorch: one .pte with `decode` and `prefill` methods lowered to XNNPACK, sharing the cache buffer."""

from __future__ import annotations

from pathlib import Path

from exporter.model import StreamingLM
from exporter.targets import ExportSpec, io_entry, require, trace


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    exir = require("executorch.exir", "executorch==1.5.1")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch==1.5.1")
    from executorch.exir.passes import MemoryPlanningPass

    programs = {"decode": trace(model, 1), "prefill": trace(model, spec.chunk)}
    spec.log("traced decode and prefill")
    edge = exir.to_edge_transform_and_lower(programs, partitioner=[xnn.XnnpackPartitioner()])
    spec.log("lowered to XNNPACK")
    # share_mutable_buffers: both methods read and write one kv_cache allocation.
    config = exir.ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
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
    }
