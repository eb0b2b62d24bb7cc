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
        return torch.ops.torchao.dequantize_affine(self.codes, [1, self.group], self.scale, self.zero, torch.int8,
                                                   -limit, limit - 1)

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
    `_drop_pages_after_reads` hands the pages back after each read of them. Needs that byte a weight free in TMPDIR."""
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


def _drop_pages_after_reads() -> None:
    """The mapped codes' pages dropped after each of coremltools' reads of all of them, so that they are resident a
    tensor at a time, not all at once: its blob writer, and the re-inference of every op after a pass (which
    compares each constant's value with itself, elementwise)."""
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.mil.operation import Operation

    write = getattr(helper._get_offset_by_writing_data, "edgekv_original", helper._get_offset_by_writing_data)
    infer = getattr(Operation.type_value_inference, "edgekv_original", Operation.type_value_inference)

    def write_then_drop(output_var, blob_writer):
        offset = write(output_var, blob_writer)
        if isinstance(output_var.val, np.ndarray):
            _drop_pages(output_var.val)
        return offset

    def infer_then_drop(self, *args, **kwargs):
        result = infer(self, *args, **kwargs)
        if self.op_type == "const" and isinstance(self.outputs[0].val, np.ndarray):
            _drop_pages(self.outputs[0].val)
        return result

    write_then_drop.edgekv_original, infer_then_drop.edgekv_original = write, infer
    helper._get_offset_by_writing_data = write_then_drop
    Operation.type_value_inference = infer_then_drop


def _convert_codes_as_views() -> None:
    """Replace coremltools' converter of torchao's dequantize_affine by one that hands constexpr_blockwise_shift_scale
    a view of torch's codes (the same bytes, typed as coremltools' sub-byte dtype), where its own copies them twice
    with `astype`: one copy of the codes in memory, not two (16 layers' export peak over 4 layers': 1.51x with it)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    @register_torch_op(torch_alias=["torchao::dequantize_affine", "torchao.dequantize_affine"], override=True)
    def dequantize_affine(context, node):
        codes, block, scale, zero, _, low, high = (i if i is None else i.val
                                                   for i in _get_inputs(context, node, expected=7))
        assert codes.dtype == "int8" and codes.ndim == 2 and block[0] == 1, "edgekv's BlockwiseLinear form"
        bits = {(-8, 7): "int4", (-128, 127): "int8"}[(low, high)]
        groups = (codes.shape[0], codes.shape[1] // block[1])
        offset = {} if zero is None else {"offset": zero.reshape(groups)}
        context.add(mb.constexpr_blockwise_shift_scale(
            data=codes.view(types.nptype_from_builtin(types.string_to_builtin(bits))), scale=scale.reshape(groups),
            name=node.name, **offset))


def overflows_fp16(value, block: int = 1 << 20) -> bool:
    """Whether a finite value is out of fp16's range (65504 < |v| < 1e38; larger ones stand for infinity, e.g. in a
    mask), checked a block at a time."""
    import numpy as np

    flat = np.asarray(value).reshape(-1)
    for start in range(0, flat.size, block):
        part = np.abs(flat[start:start + block])
        if np.logical_and(part > 65504, part < 1e38).any():
            return True
    return False


def _lean_fp16_overflow_check() -> None:
    """coremltools' check, before casting an op to fp16, that its fp32 constants fit, done by `overflows_fp16`. Its
    own took |v|, a mask and np.where's int64 indices of the whole constant: about 8 bytes for each byte of it,
    8.7 GB for a 1B model's fp32 embedding table."""
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    def fp16_overflow(op) -> bool:
        return any(var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                   and overflows_fp16(var.op.val.val)
                   for inputs in op.inputs.values()
                   for var in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)


def _fp16_promotion() -> None:
    """An op whose inputs mix fp16 and fp32 computes in fp16, as the whole program will (compute_precision FLOAT16).
    coremltools promoted to fp32 instead, and for a constant that is a copy: an fp16 model's every weight met an
    fp32 activation (its converter reads the fp16 state as fp32) and was copied to fp32, 5 GB for 1B."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend import _utils as frontend_utils
    from coremltools.converters.mil.frontend.torch import ops, quantization_ops
    from coremltools.converters.mil.mil import Var, types

    promote = getattr(ops.promote_input_dtypes, "edgekv_original", ops.promote_input_dtypes)

    def to_fp16(var):
        if var.dtype != types.fp32:
            return var
        return mb.cast(x=var, dtype="fp16") if var.val is None else mb.const(val=np.float16(var.val))

    def promote_to_fp16(input_vars):
        input_vars = [v if isinstance(v, Var) else mb.const(val=v) for v in input_vars]
        if any(v.dtype == types.fp16 for v in input_vars):
            input_vars = [to_fp16(v) for v in input_vars]
        return promote(input_vars)

    promote_to_fp16.edgekv_original = promote
    for module in (ops, quantization_ops, frontend_utils):
        module.promote_input_dtypes = promote_to_fp16


def _fp16_warnings(model: StreamingLM, log) -> None:
    """fp16 cannot hold weights past 65504, and ~3 significant digits cost logits accuracy."""
    worst = max((p.detach().abs().max().item(), n) for n, p in model.named_parameters())
    if worst[0] > FP16_MAX:
        log(f"warning: {worst[1]} holds {worst[0]:.3g}, beyond fp16's range: Core ML outputs will overflow")


def quantize(mlmodel, vocab: int, quant: Quantization):
    """coremltools.optimize: int4/int8 weights per block of `group_size` input channels (iOS 18's
    constexpr_blockwise_shift_scale), for every linear layer and the embedding table. int8 is symmetric (fp16
    scales); int4 is affine: uint4 codes with an fp16 scale and an fp16 zero point (the op's `offset` takes
    floats) per block, written by exporter.quantize.affine_int4 through coremltools' own pass. The rotary
    tables, also gathered from constants, stay fp16: only the gather from the [vocab, hidden] table is named."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.models import utils as model_utils
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    mode = "linear" if quant.bits == 4 else "linear_symmetric"
    op = OpLinearQuantizerConfig(mode=mode, dtype=quant.scheme, granularity="per_block",
                                 block_size=[1, quant.group_size], weight_threshold=0)
    embedding = [o.name for o in mlmodel._mil_program.functions["main"].operations
                 if o.op_type == "gather" and o.x.op is not None and o.x.op.op_type == "const"
                 and o.x.shape[0] == vocab]
    config = OptimizationConfig(op_type_configs={"linear": op}, op_name_configs={name: op for name in embedding})
    if quant.bits != 4:
        return linear_quantize_weights(mlmodel, config)
    affine = _affine_int4_pass()
    affine.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    return model_utils._apply_graph_pass(mlmodel, affine)


def _affine_int4_pass():
    """coremltools' weight quantization pass with its blockwise rounding replaced by affine_int4."""
    import numpy as np
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    class AffineInt4(linear_quantize_weights):
        @classmethod
        def blockwise_compress_by_dtype(cls, original_data, dtype, mode, block_sizes):
            if original_data.ndim != 2 or list(block_sizes[:1]) != [1]:
                return None
            q, scale, zero = affine_int4(torch.from_numpy(original_data.astype(np.float32)), block_sizes[1])
            return optimize_utils.QuantParams(data=q.numpy().astype(types.np_uint4_dtype),
                                              scale=scale.numpy().astype(np.float16),
                                              offset=zero.numpy().astype(np.float16), nbits=np.uint8(4))

    return AffineInt4()


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
    import numpy as np

    _fp16_warnings(model, spec.log)
    _lean_fp16_overflow_check()
    _fp16_promotion()
    if model.packed:
        _convert_codes_as_views()
        _drop_pages_after_reads()
    # The cache write as a whole-cache blend, the form coremltools converts (it rejects index_copy); a shallow
    # copy, so the caller's model keeps its in-place write.
    model = copy.copy(model)
    model.write_in_place = False
    shape = tuple(model.kv_cache.shape)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        packages = {}
        for name, tokens in (("decode", 1), ("prefill", spec.chunk)):
            # Core ML wants int32 inputs; decompositions first (DESIGN.md probe).
            program = trace(model, tokens, torch.int32).run_decompositions({})
            mlmodel = ct.convert(
                program,
                inputs=[ct.TensorType(name="tokens", shape=(1, tokens), dtype=np.int32),
                        ct.TensorType(name="input_pos", shape=(1,), dtype=np.int32)],
                outputs=[ct.TensorType(name="logits", dtype=np.float32)],
                states=[ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name="kv_cache")],
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.precision.FLOAT16,
                convert_to="mlprogram",
                pass_pipeline=_pipeline(ct),
            )
            if spec.quant.bits and not model.packed:
                mlmodel = quantize(mlmodel, model.cfg.vocab_size, spec.quant)
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
            ("torchao dequantize_affine, written as each weight was read" if model.packed else
             "coremltools.optimize linear_quantize_weights") if spec.quant.bits else "none",
            spec.quant.describe("fp16 scales and zero points") + ", linear layers and embedding "
            "(constexpr_blockwise_shift_scale)" if spec.quant.bits else "float16",
            "float16", "float16"),
    }
