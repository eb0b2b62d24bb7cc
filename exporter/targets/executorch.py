"""ExecuTorch: one .pte with `decode` and `prefill` methods lowered to XNNPACK, sharing the cache buffer."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from exporter.model import StreamingLM
from exporter.quantize import OffsetEmbedding, OffsetLinear, Quantization
from exporter.targets import ExportSpec, io_entry, require, trace
from exporter.targets.compat import executorch as compat
from runtimes.executorch_runner import IDENTITY_METHOD, READ_CACHE, WRITE_CACHE

ROWS = 8192  # rows quantized at a time: a 128k-row table's float temporaries took 3.4 GB, a block's take 1/16


def pack(module: torch.nn.Module, quant: Quantization) -> torch.nn.Module:
    """One layer in torchao's form for XNNPACK (_torchao), quantized as it is read (loaders.build_model); a tied
    table is packed twice, for the lookup and for the output projection. A big table is quantized a block
    of rows at a time and joined: every scale and offset belongs to one row, so the numbers are the same."""
    if module.weight.shape[0] > ROWS:
        return _joined([pack(_rows(module, i, i + ROWS), quant) for i in range(0, module.weight.shape[0], ROWS)])
    module = module.float()  # the checkpoint's dtype until now (loaders.build_model); torchao's scales follow it
    if quant.bits == 4:
        kind = OffsetEmbedding if isinstance(module, torch.nn.Embedding) else XnnpackOffsetLinear
        module = kind(module, quant.group_size)
    holder = torch.nn.Module()  # quantize_ replaces the modules under a parent
    holder.layer = module
    _torchao(holder, quant)
    return holder.layer


class XnnpackOffsetLinear(OffsetLinear):
    """OffsetLinear as XNNPACK runs it whole. The group sums are the mean of a [1, N, group, 1] view over its last
    two dims times the group (the only reduction XNNPACK delegates; exact scalings for a power of two): as a sum
    over the last dim they ran outside XNNPACK and split every layer into five partitions (SmolLM2: 153 a method;
    32 so, fp32 33). The offsets are int8 per output channel with int8 activations (8da8w, _torchao): in float32
    they were 0.15 GB of the 0.85 GB a 1B int4 step reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(1, -1, self.group, 1)
        sums = rows.mean(dim=(-2, -1), keepdim=True) * self.group
        return self.linear(x) + self.offset(sums.view(*x.shape[:-1], x.shape[-1] // self.group))


def _rows(module: torch.nn.Module, start: int, stop: int) -> torch.nn.Module:
    """Rows start:stop of a linear layer or an embedding, viewing its weights."""
    rows = copy.copy(module)
    rows._parameters = {
        name: None if p is None else torch.nn.Parameter(p[start:stop], requires_grad=False)
        for name, p in module._parameters.items()
    }
    return _sized(rows)


def _sized(module: torch.nn.Module) -> torch.nn.Module:
    """Its linear layers' and embeddings' row counts as their weights have them."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.out_features = m.weight.shape[0]
        elif isinstance(m, torch.nn.Embedding):
            m.num_embeddings = m.weight.shape[0]
    return module


def _joined(parts: list[torch.nn.Module]) -> torch.nn.Module:
    """Packed blocks of rows as one module: each weight (torchao's tensors by their inner tensors) concatenated."""

    def cat(tensors):
        first = tensors[0]
        if not hasattr(first, "tensor_data_names"):
            return torch.cat(tensors)
        inner = [torch.cat([getattr(t, name) for t in tensors]) for name in first.tensor_data_names]
        return type(first)(*inner, *(getattr(first, name) for name in first.tensor_attribute_names))

    whole = parts[0]
    for name, _ in list(whole.named_parameters()):
        owner, _, attr = name.rpartition(".")
        joined = cat([part.get_parameter(name) for part in parts])
        setattr(whole.get_submodule(owner), attr, torch.nn.Parameter(joined, requires_grad=False))
    return _sized(whole)


def _torchao(model: torch.nn.Module, quant: Quantization) -> None:
    require("torchao", "torchao==0.18.0")
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    dtype = getattr(torch, quant.scheme)
    mapping = MappingType.SYMMETRIC_NO_CLIPPING_ERR if quant.bits == 4 else MappingType.SYMMETRIC
    linear = PerGroup(quant.group_size) if quant.bits == 4 else PerAxis(0)

    def weights(kind, offsets=False):
        return lambda m, name: isinstance(m, kind) and name.endswith("offset") == offsets

    quantize_(
        model,
        Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=linear, weight_mapping_type=mapping
        ),
        filter_fn=weights(torch.nn.Linear),
    )
    if quant.bits == 4:  # XnnpackOffsetLinear's offsets (the lookup's stay float32: one row is read a token)
        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int8, weight_granularity=PerAxis(0), weight_mapping_type=MappingType.SYMMETRIC
            ),
            filter_fn=weights(torch.nn.Linear, offsets=True),
        )
    quantize_(
        model,
        IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(quant.group_size), mapping_type=mapping),
        filter_fn=weights(torch.nn.Embedding),
    )


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
    require("executorch.backends.xnnpack.partition.xnnpack_partitioner", "executorch==1.5.1")
    quant = spec.quant
    # One buffer per layer and half: ExecuTorch copies every slice it takes of a buffer.
    split = model.per_layer_cache()
    programs = {"decode": trace(split, 1), "prefill": trace(split, spec.chunk), **cache_access(split)}
    spec.log("traced decode and prefill")
    # The lowering with the weights held once, a 7B model needs it, and without its slowest redundant work
    # (exporter/targets/compat/executorch.py); the serialized weights spill into `spill` until the .pte is written.
    with tempfile.TemporaryDirectory(dir=out_dir) as spill, compat.hooks(Path(spill)):
        _lower_and_write(programs, out_dir / "model.pte", spec, quant)
    return {
        "files": {"model": "model.pte"},
        "entries": {"decode": "decode", "prefill": "prefill"},
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1])],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size])],
        "state": [io_entry("cache", f"cache_{j}", "float32", list(c.shape)) for j, c in enumerate(split.caches())],
        "compute_precision": "float32",
        "quantization": quant.manifest(
            f"torchao Int8DynamicActivationIntxWeightConfig ({quant.scheme}) + XNNPACK" if quant.bits else "none",
            {
                "int4": quant.describe(
                    "stored as symmetric int4 + offsets in int8 per output channel (the embedding's in float32)"
                ),
                "int8": f"int8 symmetric per output channel (embedding: groups of {quant.group_size})",
            }.get(quant.scheme, "float32"),
            "int8 dynamic, per token" if quant.bits else "float32",
            "float32",
        ),
    }


def _lower_and_write(programs: dict, path: Path, spec: ExportSpec, quant: Quantization) -> None:
    from executorch import exir
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.passes import MemoryPlanningPass

    # Without the edge dialect's IR verifier, as ExecuTorch's own LLM export does (extension/llm/export/builder.py):
    # it re-checked every op's dtypes after each pass, a tenth of the lowering's time. The artifact is run by tests.
    edge = exir.to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        compile_config=exir.EdgeCompileConfig(_check_ir_validity=False),
        constant_methods={IDENTITY_METHOD: spec.identity},
    )
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
    with open(path, "wb") as f:  # piece by piece: `program.buffer` joins a copy of the whole file
        program.write_to_file(f)
