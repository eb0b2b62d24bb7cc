"""ExecuTorch: one .pte with `decode` and `prefill` methods lowered to XNNPACK, sharing the cache buffer."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from exporter.model import StreamingLM
from exporter.quantize import OffsetEmbedding, OffsetLinear, Quantization, untied, with_offsets
from exporter.targets import ExportSpec, io_entry, require, trace
from runtimes.executorch_runner import IDENTITY_METHOD, READ_CACHE, WRITE_CACHE


def quantize(model: StreamingLM, quant: Quantization) -> StreamingLM:
    """torchao on an untied copy. Linear layers: int8 dynamic activations x int4 weights in groups (8da4w) or
    int8 weights per output channel (8da8w), the forms XNNPACK runs. Embedding: int4/int8 weights in groups,
    fused at to_executorch into quantized_decomposed::embedding_{4bit,byte} (the runtime needs
    ExecuTorch's quantized kernels: `import executorch.kernels.quantized` in Python).
    int4 is affine: XNNPACK's 4-bit weights are symmetric, so each layer carries symmetric weights plus float32
    offsets (exporter.quantize.with_offsets); the scale rule that never clips recovers the grid's scale exactly."""
    model = untied(model)
    if quant.bits == 4:
        model = with_offsets(model, quant.group_size)
    _torchao(model, quant)
    return model


def pack(module: torch.nn.Module, quant: Quantization) -> torch.nn.Module:
    """One layer as `quantize` leaves it, quantized as it is read (loaders.build_model); a tied table is packed
    twice, for the lookup and for the output projection, as `quantize` unties it."""
    module = module.float()  # the checkpoint's dtype until now (loaders.build_model); torchao's scales follow it
    if quant.bits == 4:
        module = (OffsetEmbedding if isinstance(module, torch.nn.Embedding) else OffsetLinear)(module, quant.group_size)
    holder = torch.nn.Module()  # quantize_ replaces the modules under a parent
    holder.layer = module
    _torchao(holder, quant)
    return holder.layer


def _torchao(model: torch.nn.Module, quant: Quantization) -> None:
    require("torchao", "torchao==0.18.0")
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    dtype = getattr(torch, quant.scheme)
    mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if quant.bits == 4 else MappingType.SYMMETRIC
    linear = PerGroup(quant.group_size) if quant.bits == 4 else PerAxis(0)

    def weights(kind):
        return lambda m, name: isinstance(m, kind) and not name.endswith("offset")

    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=linear,
                                                           weight_mapping_type=mapping),
              filter_fn=weights(torch.nn.Linear))
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(quant.group_size),
                                          mapping_type=mapping),
              filter_fn=weights(torch.nn.Embedding))


def cache_access(split: StreamingLM) -> dict[str, torch.export.ExportedProgram]:
    """Two methods over the same cache buffers as decode and prefill (shared by name at to_executorch): read_cache
    returns the 2L buffers, write_cache copies 2L tensors into them. Sessions need them: ExecuTorch's runtime has
    no other way to the buffers it plans."""

    def read(self):
        return tuple(c.clone() for c in self.caches())

    def write(self, caches: list[torch.Tensor]):
        for buffer, value in zip(self.caches(), caches, strict=True):
            buffer.copy_(value)
        return torch.ones(1)

    programs = {}
    for name, forward, args in ((READ_CACHE, read, ()), (WRITE_CACHE, write, ([c.clone() for c in split.caches()],))):
        access = copy.copy(split)  # the same buffers, by the same names; only forward differs
        access.__class__ = type(name, (type(split),), {"forward": forward})
        with torch.no_grad():
            programs[name] = torch.export.export(access, args, strict=False)
    return programs


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    exir = require("executorch.exir", "executorch==1.5.1")
    xnn = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch==1.5.1")
    from executorch.exir.passes import MemoryPlanningPass

    quant = spec.quant
    if quant.bits and not model.packed:
        model = quantize(model, quant)
        spec.log(f"quantized weights to {quant.scheme} with torchao")
    # One buffer per layer and half: ExecuTorch copies every slice it takes of a buffer.
    split = model.per_layer_cache()
    programs = {"decode": trace(split, 1), "prefill": trace(split, spec.chunk), **cache_access(split)}
    spec.log("traced decode and prefill")
    # Without the edge dialect's IR verifier, as ExecuTorch's own LLM export does (extension/llm/export/builder.py):
    # it re-checked every op's dtypes after each pass, a tenth of the lowering's time. The artifact is run by tests.
    edge = exir.to_edge_transform_and_lower(programs, partitioner=[xnn.XnnpackPartitioner()],
                                            compile_config=exir.EdgeCompileConfig(_check_ir_validity=False),
                                            constant_methods={IDENTITY_METHOD: spec.identity})
    spec.log("lowered to XNNPACK")
    # share_mutable_buffers: both methods read and write the same cache buffers.
    config = exir.ExecutorchBackendConfig(
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
        do_quant_fusion_and_const_prop=bool(quant.bits),  # dequantize + embedding -> quantized embedding op
        # The cache write (StreamingLM.written: index_put_ of the new entries) runs in place on the buffer:
        # one slot per layer written a token, the cache never copied.
        run_reinplace_pass=True,
    )
    program = edge.to_executorch(config)
    with open(out_dir / "model.pte", "wb") as f:  # piece by piece: `program.buffer` joins a copy of the whole file
        program.write_to_file(f)
    return {
        "files": {"model": "model.pte"},
        "entries": {"decode": "decode", "prefill": "prefill"},
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1])],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size])],
        "state": [io_entry("cache", f"cache_{j}", "float32", list(c.shape)) for j, c in enumerate(split.caches())],
        "compute_precision": "float32",
        "quantization": quant.manifest(
            f"torchao Int8DynamicActivationIntxWeightConfig ({quant.scheme}) + XNNPACK" if quant.bits else "none",
            {"int4": quant.describe("stored as symmetric int4 + float32 offsets"),
             "int8": f"int8 symmetric per output channel (embedding: groups of {quant.group_size})",
             }.get(quant.scheme, "float32"),
            "int8 dynamic, per token" if quant.bits else "float32", "float32"),
    }
