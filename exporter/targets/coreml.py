"""Core ML: a stateful ML program for iOS 18 / macOS 15, fp16 compute with the cache as fp16 state,
and `decode` + `prefill` functions in one multifunction package that shares the weights."""

from __future__ import annotations

import copy
import ctypes
import json
import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporter.model import StreamingLM
from exporter.quantize import Quantization, affine_int4, block_quantize, by_rows
from exporter.targets import ExportSpec, io_entry, require, trace
from exporter.targets.compat import coreml as compat
from exporter.targets.mlpackage import merge

FP16_MAX = 65504.0
# An unquantized export reads the checkpoint into fp16 (exporter.export), the precision the package computes in, so
# fp32 weights never exist: 2.5 GB of weights for a 1B model where fp32 and the converter's fp16 casts held 7.4 GB.
FLOAT_DTYPE = torch.float16


class BlockwiseLinear(torch.nn.Module):
    """A linear layer (or, read by rows, an embedding table) whose weight is torchao's `dequantize_affine` of int8
    codes, the form coremltools converts into constexpr_blockwise_shift_scale as it is (int4 codes stored as
    such): int4 affine as affine_int4's codes and zero points less 8 (-8 .. 7, the grid coremltools takes); int8
    symmetric per group. A tied table serves the lookup and the output projection from one constant."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: Quantization):
        super().__init__()
        self.group, self.bits = quant.group_size, quant.bits
        if quant.bits == 4:
            q, scale, zero = by_rows(lambda w: affine_int4(w, self.group), weight.detach())
            codes, zero = q.to(torch.int8) - 8, zero - 8
        else:
            q, scale = by_rows(lambda w: block_quantize(w.numpy(), 8, self.group), weight.detach())
            codes, scale, zero = torch.from_numpy(q.astype("int8")), torch.from_numpy(scale), None
        self.register_buffer("codes", _mapped(codes.contiguous()))
        # fp16, as the package stores them: in fp32 they took twice the memory and coremltools cast a copy.
        self.register_buffer("scale", scale.half().contiguous())
        self.register_buffer("zero", zero if zero is None else zero.half().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def weight(self) -> torch.Tensor:
        limit = 2 ** (self.bits - 1)
        return torch.ops.torchao.dequantize_affine(
            self.codes, [1, self.group], self.scale, self.zero, torch.int8, -limit, limit - 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class BlockwiseEmbedding(torch.nn.Module):
    def __init__(self, table: BlockwiseLinear):
        super().__init__()
        self.table = table

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.table.weight())


def pack(module: torch.nn.Module, quant: Quantization) -> torch.nn.Module:
    require("torchao", "torchao==0.18.0")
    if isinstance(module, torch.nn.Embedding):
        return BlockwiseEmbedding(BlockwiseLinear(module.weight, None, quant))
    return BlockwiseLinear(module.weight, module.bias, quant)


def pack_tied(embedding, head, quant: Quantization) -> tuple[torch.nn.Module, torch.nn.Module]:
    table = pack(head, quant)
    return BlockwiseEmbedding(table), table


# The codes of every BlockwiseLinear alive, by address: the pages of these may be dropped once written.
_MAPPED: dict[int, weakref.ref] = {}


def _mapped(codes: torch.Tensor) -> torch.Tensor:
    """codes over a shared mapping of an unlinked temporary file: pages the kernel reads in when the converter reads
    them and may drop (clean file pages), where in anonymous memory they were the export's peak. coremltools holds
    int4 codes a byte each (numpy has no 4-bit type) for the whole program, a byte a weight: 7.25 GB at 7B.
    compat.coreml hands the pages back (`_drop_pages`) after each of coremltools' full reads of them. Needs that
    byte a weight free in TMPDIR."""
    with tempfile.NamedTemporaryFile(prefix="edgekv-codes-") as f:  # unlinked on leaving; the mapping keeps it
        codes.numpy().tofile(f)
        f.flush()
        mapped = torch.from_file(f.name, shared=True, size=codes.numel(), dtype=codes.dtype).view(codes.shape)
    _MAPPED[mapped.data_ptr()] = weakref.ref(mapped)
    weakref.finalize(mapped, _MAPPED.pop, mapped.data_ptr(), None)
    return mapped


def _drop_pages(array) -> None:
    """MADV_DONTNEED on the pages of a `_mapped` tensor's file mapping (reread from the file if touched again); any
    other memory is left alone."""
    address = array.__array_interface__["data"][0]
    ref = _MAPPED.get(address)
    tensor = ref() if ref else None
    if tensor is None or tensor.data_ptr() != address or sys.platform == "win32":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(tensor.numel() * tensor.element_size()), 4)


def _fp16_warnings(model: StreamingLM, log) -> None:
    """fp16 cannot hold weights past 65504, and ~3 significant digits cost logits accuracy."""
    worst = max((p.detach().abs().max().item(), n) for n, p in model.named_parameters())
    if worst[0] > FP16_MAX:
        log(f"warning: {worst[1]} holds {worst[0]:.3g}, beyond fp16's range: Core ML outputs will overflow")


def stamp(package: Path, identity: str) -> None:
    """The identity as user-defined metadata of the package's spec (MLModel.modelDescription.metadata in the app;
    the merged package keeps no metadata of its functions, so it is written into the saved spec)."""
    import coremltools as ct

    manifest = json.loads((package / "Manifest.json").read_text())
    spec_file = package / "Data" / manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    spec = ct.proto.Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec.description.metadata.userDefined["edgekv"] = identity
    spec_file.write_bytes(spec.SerializeToString())


def _pipeline(ct):
    """coremltools' default passes but `const_deduplication`, which evaluated every quantized weight to float and
    compared equal-shaped ones in full (7 bytes a weight at its peak: 10 GB for a 1B int4 model). Weights are
    never duplicates; the tied table is one torch constant already, and `merge` shares decode's and prefill's."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(["common::const_deduplication"])
    return pipeline


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    ct = require("coremltools", "coremltools==9.0")
    _fp16_warnings(model, spec.log)
    # Decode writes its one slot as a slice_update of the state; prefill, whose chunk may wrap the ring, blends
    # the whole cache (coremltools rejects index_copy). A shallow copy: the caller's model keeps its own write.
    model = copy.copy(model)
    model.cache_write = "coreml"
    shape = tuple(model.kv_cache.shape)
    # coremltools in less memory: exporter/targets/compat/coreml.py (packed: the codes' pages dropped as read).
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, compat.hooks(bool(model.packed), _drop_pages):
        packages = {}
        for name, tokens in (("decode", 1), ("prefill", spec.chunk)):
            # Core ML wants int32 inputs; decompositions first (DESIGN.md probe).
            program = trace(model, tokens, torch.int32).run_decompositions({})
            mlmodel = ct.convert(
                program,
                inputs=[
                    ct.TensorType(name="tokens", shape=(1, tokens), dtype=np.int32),
                    ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32),
                ],
                outputs=[ct.TensorType(name="logits", dtype=np.float32)],
                states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="kv_cache")],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
                pass_pipeline=_pipeline(ct),
            )
            path = Path(tmp) / f"{name}.mlpackage"
            mlmodel.save(str(path))
            del mlmodel, program
            packages[name] = path
            spec.log(f"converted {name} function")
        merge(packages, out_dir / "model.mlpackage", default="decode")
    stamp(out_dir / "model.mlpackage", spec.identity)
    spec.log("saved multifunction package")
    return {
        "files": {"model": "model.mlpackage"},
        "entries": {"decode": "decode", "prefill": "prefill"},
        "inputs": [io_entry("tokens", "tokens", "int32", [1, "T"]), io_entry("position", "input_pos", "int32", [1])],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size])],
        "state": [io_entry("cache", "kv_cache", "float16", list(shape))],
        "compute_precision": "float16",
        "minimum_deployment_target": "iOS18",
        "quantization": spec.quant.manifest(
            "torchao dequantize_affine, written as each weight was read" if spec.quant.bits else "none",
            spec.quant.describe("fp16 scales and zero points") + ", linear layers and embedding "
            "(constexpr_blockwise_shift_scale)"
            if spec.quant.bits
            else "float16",
            "float16",
            "float16",
        ),
    }
