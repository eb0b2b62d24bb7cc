"""coremltools converting a model in less memory: fp16 promotion where it copied every weight to fp32, its fp16
range check a block at a time, torchao's int4/int8 codes handed over as views and their file pages dropped after
each full read. `hooks(packed, release)` applies them for one export (exporter/targets/coreml.py); the package is the
one coremltools writes itself (tests/test_compat.py). What each fixes upstream: docs/upstream.md."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np

from exporter.targets.compat import Hook, patched

COREMLTOOLS = "coremltools 9.0"
MIL = "coremltools.converters.mil"
DEQUANTIZE = ("dequantize_affine", "torchao::dequantize_affine", "torchao.dequantize_affine")


def make_hooks(packed: bool, release: Callable[[np.ndarray], None]) -> list[Hook]:
    """The hooks for a conversion; `packed`: the model holds torchao's codes (BlockwiseLinear), whose pages
    `release(array)` may drop once read (exporter.targets.coreml._drop_pages)."""
    hooks = [
        # Its check that an op's fp32 constants fit fp16 took |v|, a mask and np.where's int64 indices of the whole
        # constant: about 8 bytes a byte of it, 8.7 GB for a 1B model's fp32 embedding table. The same rule a block
        # at a time (16.06 -> 8.87 GB).
        Hook(
            f"{MIL}.mil.passes.defs.quantization:FP16ComputePrecision.fp16_overflow",
            staticmethod(_fp16_overflow),
            COREMLTOOLS,
            "16442a50be56e0f9",
        ),
        # An op mixing fp16 and fp32 was promoted to fp32, a copy of each constant: an fp16 model's every weight met
        # an fp32 activation (the fp16 state is read as fp32) and was copied, 5 GB for 1B (8.87 -> 4.03 GB). It
        # computes in fp16, as the whole program will. The torch frontend imported the function three times.
        *(
            Hook(
                f"{MIL}.frontend.{module}:promote_input_dtypes",
                _promoting_to_fp16,
                COREMLTOOLS,
                "2bde85283627c313",
                wraps=True,
            )
            for module in ("torch.ops", "torch.quantization_ops", "_utils")
        ),
    ]
    if packed:
        hooks += [
            # Its converter of torchao's dequantize_affine copied the int8 codes twice (`astype`); this one hands
            # constexpr_blockwise_shift_scale a view of torch's (16 layers' export peak over 4 layers': 1.51x before).
            *(
                Hook(
                    f"{MIL}.frontend.torch.torch_op_registry:_TORCH_OPS_REGISTRY.name_to_func_mapping",
                    _dequantize_affine,
                    COREMLTOOLS,
                    "55943094fc4f16b5",
                    key=name,
                )
                for name in DEQUANTIZE
            ),
            # coremltools holds the codes a byte each for the whole program (7.25 GB at 7B): they are a file mapping
            # whose pages are dropped after each of its two full reads, the blob writer's and the re-inference of
            # every op after a pass (16 over 4 layers: 1.37x -> 1.11x; 7B int4 8.90 -> 2.05 GB).
            Hook(
                f"{MIL}.backend.mil.helper:_get_offset_by_writing_data",
                lambda write: _writing(write, release),
                COREMLTOOLS,
                "5759e5ade997accd",
                wraps=True,
            ),
            Hook(
                f"{MIL}.mil.operation:Operation.type_value_inference",
                lambda infer: _inferring(infer, release),
                COREMLTOOLS,
                "14f8fdda0e010451",
                wraps=True,
            ),
        ]
    return hooks


@contextlib.contextmanager
def hooks(packed: bool, release: Callable[[np.ndarray], None]) -> Iterator[None]:
    with patched(make_hooks(packed, release)):
        yield


def overflows_fp16(value, block: int = 1 << 20) -> bool:
    """Whether a finite value is out of fp16's range (65504 < |v| < 1e38; larger ones stand for infinity, e.g. in a
    mask), checked a block at a time: coremltools 9.0's rule (FP16ComputePrecision.fp16_overflow)."""
    flat = np.asarray(value).reshape(-1)
    for start in range(0, flat.size, block):
        part = np.abs(flat[start : start + block])
        if np.logical_and(part > 65504, part < 1e38).any():
            return True
    return False


def _fp16_overflow(op) -> bool:
    """FP16ComputePrecision.fp16_overflow: whether any of the op's fp32 constants is out of fp16's range."""
    return any(
        var.op is not None
        and var.op.op_type == "const"
        and var.is_tensor_or_scalar_of(dtype="fp32")
        and overflows_fp16(var.op.val.val)
        for inputs in op.inputs.values()
        for var in (inputs if isinstance(inputs, (list, tuple)) else [inputs])
    )


def _promoting_to_fp16(promote):
    """promote_input_dtypes, with inputs mixing fp16 and fp32 made fp16 first."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Var, types

    def to_fp16(var):
        if var.dtype != types.fp32:
            return var
        return mb.cast(x=var, dtype="fp16") if var.val is None else mb.const(val=np.float16(var.val))

    def promote_to_fp16(input_vars):
        input_vars = [v if isinstance(v, Var) else mb.const(val=v) for v in input_vars]
        if any(v.dtype == types.fp16 for v in input_vars):
            input_vars = [to_fp16(v) for v in input_vars]
        return promote(input_vars)

    return promote_to_fp16


def _dequantize_affine(context, node) -> None:
    """coremltools' converter of torchao's dequantize_affine, for edgekv's BlockwiseLinear form (int8 codes, rank 2,
    groups along rows): the codes as a view typed as coremltools' int4 / int8 dtype."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, expected=7)
    codes, block, scale, zero, _, low, high = (i if i is None else i.val for i in inputs)
    assert codes.dtype == "int8" and codes.ndim == 2 and block[0] == 1, "edgekv's BlockwiseLinear form"
    bits = {(-8, 7): "int4", (-128, 127): "int8"}[(low, high)]
    groups = (codes.shape[0], codes.shape[1] // block[1])
    offset = {} if zero is None else {"offset": zero.reshape(groups)}
    context.add(
        mb.constexpr_blockwise_shift_scale(
            data=codes.view(types.nptype_from_builtin(types.string_to_builtin(bits))),
            scale=scale.reshape(groups),
            name=node.name,
            **offset,
        )
    )


def _writing(write, release: Callable[[np.ndarray], None]):
    """helper._get_offset_by_writing_data (the blob writer's), each array released once written."""

    def write_then_drop(output_var, blob_writer):
        offset = write(output_var, blob_writer)
        if isinstance(output_var.val, np.ndarray):
            release(output_var.val)
        return offset

    return write_then_drop


def _inferring(infer, release: Callable[[np.ndarray], None]):
    """Operation.type_value_inference, a const's array released once re-inferred (compared with itself)."""

    def infer_then_drop(self, *args, **kwargs):
        result = infer(self, *args, **kwargs)
        if self.op_type == "const" and isinstance(self.outputs[0].val, np.ndarray):
            release(self.outputs[0].val)
        return result

    return infer_then_drop
