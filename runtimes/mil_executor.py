"""A NumPy executor for the Core ML ML programs edgekv writes, so Linux can run a `.mlpackage`.

It reads the program (MIL) from the package's protobuf spec and weight blob with coremltools' own
loaders, then runs each function op by op. What "computed as Core ML computes" means here:

- An fp16 tensor holds fp16 values (kept in float32 arrays, which hold every fp16 value exactly).
  Each op reads its fp16 inputs exactly, computes in fp32 and rounds its result to fp16 (nearest
  even; past 65504 it becomes inf, as in fp16). For +, -, *, / this is exactly IEEE fp16 arithmetic:
  fp32 has more than twice fp16's precision, so rounding twice equals rounding once.
- Reductions (linear, matmul, reduce_mean, softmax) accumulate in fp32 before the one rounding.
  Core ML does not document its accumulation precision (it differs between CPU, GPU and Neural
  Engine); this is the executor's choice, and `edgekv validate`'s fp16 bound covers the difference.
- Integer and bool tensors keep their declared type; every op's result is checked against the dtype
  and shape the program declares, so a wrong semantic shows up as an error, not a drift.
- `read_state` returns the state's current value and `write_state` replaces it; the caller owns the
  state (`make_state`, fp16 states held as float32 arrays of fp16 values like every fp16 tensor here),
  as `MLState` is owned by the caller in Core ML.
- `slice_update` writes into its input in place where nothing else reads that input afterwards (decided
  once, at load: `_plan_in_place`), so a decode step's write of one cache slot costs that slot, not a
  copy of the whole state, as on the device.

An op the executor does not implement, or an input or attribute value it does not implement, fails
loudly naming the op and the function it sits in. Nothing is skipped or approximated silently.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.errors import EdgekvError

FP16 = np.dtype(np.float16)


class Unsupported(Exception):
    """An input or attribute value the executor does not implement (raised by an op function)."""


# ---------------------------------------------------------------------------------------------
# The ops. Each takes the MIL op's inputs as keyword arguments (fp16 tensors arrive as float32
# holding fp16 values) and returns an array; the executor rounds and checks the result.


def _cast(x, dtype: str):
    targets = {
        "fp16": np.float32,
        "fp32": np.float32,
        "int32": np.int32,
        "int16": np.int16,
        "uint16": np.uint16,
        "int8": np.int8,
        "uint8": np.uint8,
        "bool": np.bool_,
    }
    if dtype not in targets:
        raise Unsupported(f"dtype={dtype!r}")
    to = np.dtype(targets[dtype])
    if to.kind in "iu":
        if x.dtype.kind == "f":
            if not np.isfinite(x).all():
                raise Unsupported("casting inf or nan to an integer")
            x = np.trunc(x)
        info = np.iinfo(to)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise Unsupported(f"values outside {dtype}'s range")
    if dtype == "bool":
        return x != 0
    return x.astype(to)


def _concat(values, axis, interleave=False):
    if interleave:
        raise Unsupported("interleave=True")
    if all(np.ndim(v) == 0 for v in values):  # MIL: scalars concatenate into a vector (a dynamic slice's begin)
        return np.stack(values)
    return np.concatenate(values, axis=int(axis))


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims != 0:
        raise Unsupported(f"batch_dims={int(batch_dims)}")
    axis, n = int(axis), x.shape[int(axis)]
    if indices.size and (indices.min() < -n or indices.max() >= n):
        raise Unsupported(f"an index outside [-{n}, {n}) (Core ML leaves this undefined)")
    return np.take(x, indices.astype(np.int64), axis=axis)


def _reshape(x, shape):
    if 0 in shape and len(shape) != x.ndim:
        raise Unsupported("a 0 in shape when the rank changes")
    return x.reshape([x.shape[i] if s == 0 else int(s) for i, s in enumerate(shape)])


def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is None:
        if x.shape[axis] % int(num_splits):
            raise Unsupported(f"num_splits={int(num_splits)} not dividing a dimension of {x.shape[axis]}")
        return np.split(x, int(num_splits), axis=axis)
    return np.split(x, np.cumsum([int(n) for n in split_sizes])[:-1], axis=axis)


def _squeeze(x, axes=None):
    return np.squeeze(x, axis=None if axes is None else tuple(int(a) for a in axes))


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


def _slice_update(
    x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None, in_place=False
):
    """x with the slice `slice_by_index` would read replaced by update, of exactly that slice's shape (a begin or
    end past x shortens the slice and is refused: Core ML leaves it undefined). In place when the executor
    planned it so (nothing reads x afterwards)."""
    index = _index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    if x[index].shape != update.shape:
        raise Unsupported(f"an update of shape {list(update.shape)} for a slice of shape {list(x[index].shape)}")
    out = x if in_place else x.copy()
    out[index] = update
    return out


def _index(ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    index = []
    for i in range(ndim):
        if squeeze_mask is not None and squeeze_mask[i]:
            index.append(int(begin[i]))
            continue
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        index.append(slice(b, e, 1 if stride is None else int(stride[i])))
    return tuple(index)


def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x, weight, bias=None):
    out = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _reduce(fn):
    def reduce(x, axes=None, keep_dims=False):
        return fn(x, axis=None if axes is None else tuple(int(a) for a in axes), keepdims=bool(keep_dims))

    return reduce


def _softmax(x, axis=-1):
    shifted = x - x.max(axis=int(axis), keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=int(axis), keepdims=True)


def _silu(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: silu -> -0
        return x / (np.float32(1) + np.exp(-x))


def _gelu(x, mode="EXACT"):
    """MIL gelu; Gemma's is TANH_APPROXIMATION. In fp32 inside (x^3 overflows fp16 past |x| = 40; GELU is then x)."""
    x32 = x.astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(np.sqrt(2 / np.pi)) * (x32 + np.float32(0.044715) * x32 * x32 * x32)
        with np.errstate(over="ignore"):
            return np.float32(0.5) * x32 * (np.float32(1) + np.tanh(inner))
    if mode == "EXACT":
        from math import erf

        return np.float32(0.5) * x32 * (np.float32(1) + np.vectorize(erf, otypes=[np.float32])(x32 / np.sqrt(2)))
    raise Unsupported(f"gelu mode {mode!r}")


def _inverse(x, epsilon=1e-4):
    with np.errstate(divide="ignore"):
        return np.float32(1) / (x + epsilon)


def _rsqrt(x, epsilon=1e-12):
    with np.errstate(divide="ignore"):
        return np.float32(1) / np.sqrt(x + epsilon)


def _blockwise_shift_scale(data, scale, offset=None):
    """iOS 18 weight dequantization: scale * (data - offset), each scale (and offset) entry covering a block of
    data.shape / scale.shape elements (the ratio along every axis)."""
    if data.ndim != scale.ndim or any(d % s for d, s in zip(data.shape, scale.shape, strict=True)):
        raise Unsupported(f"scale of shape {list(scale.shape)} for data of shape {list(data.shape)}")

    def spread(t):
        for axis, (d, s) in enumerate(zip(data.shape, t.shape, strict=True)):
            t = np.repeat(t, d // s, axis=axis)
        return t

    values = data.astype(np.float32)
    if offset is not None:
        values = values - spread(offset.astype(np.float32))
    return values * spread(scale.astype(np.float32))


OPS: dict[str, Callable[..., np.ndarray]] = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "floor_div": lambda x, y: np.floor_divide(x, y),
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "equal": lambda x, y: np.equal(x, y),
    "not_equal": lambda x, y: np.not_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_or": lambda x, y: np.logical_or(x, y),
    "logical_not": lambda x: np.logical_not(x),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "clip": lambda x, alpha, beta: np.minimum(np.maximum(x, alpha), beta),
    "cast": _cast,
    "concat": _concat,
    "stack": lambda values, axis: np.stack(values, axis=int(axis)),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(int(a) for a in axes)),
    "reshape": _reshape,
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "slice_by_index": _slice_by_index,
    "slice_update": _slice_update,
    "split": _split,
    "squeeze": _squeeze,
    "gather": _gather,
    "linear": _linear,
    "matmul": _matmul,
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_sum": _reduce(np.sum),
    "abs": lambda x: np.abs(x),
    "inverse": _inverse,
    "rsqrt": _rsqrt,
    "softmax": _softmax,
    "silu": _silu,
    "gelu": _gelu,
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
}
STATE_OPS = ("read_state", "write_state")
# Ops that only move values: MIL types their fp16 output from fp16 inputs, which already hold fp16 values,
# so rounding their result again would change nothing (it is a third of the executor's time on SmolLM2).
MOVES = {
    "read_state",
    "reshape",
    "transpose",
    "slice_by_index",
    "slice_update",
    "split",
    "squeeze",
    "concat",
    "stack",
    "expand_dims",
    "gather",
}

# Ops whose result may be a view of their first input (NumPy slicing and reshaping), so writing into one
# writes into the other.
VIEWS = {"read_state", "reshape", "transpose", "slice_by_index", "split", "squeeze", "expand_dims"}


# ---------------------------------------------------------------------------------------------
# Loading a program


@dataclass
class _Op:
    type: str
    name: str  # the op's first output, as Core ML and coremltools name ops in messages
    args: dict[str, Any]  # input name -> ("ref", var) | ("val", value) | list of those
    outputs: list[tuple[str, np.dtype, tuple | None]]
    fn: Callable | None
    fixed: dict = field(default_factory=dict)  # keyword arguments known at load (`_prepare`)
    refs: list = field(default_factory=list)  # (keyword, name of the value it reads) per call
    lists: list = field(default_factory=list)  # (keyword, [("ref", name) | ("val", value)]): concat/stack values
    in_place: bool = False  # slice_update: writes into its input; read_state: the state's array (`_plan_in_place`)


@dataclass
class Function:
    name: str
    inputs: dict[str, tuple[np.dtype, tuple]]
    states: dict[str, tuple[np.dtype, tuple]]
    ops: list[_Op]
    outputs: dict[str, np.dtype]


def _tensor_type(value_type) -> tuple[np.dtype, tuple | None]:
    """(numpy dtype, static shape or None) of a MIL tensor type; fp16 -> float16."""
    from coremltools.converters.mil.mil import types

    t = value_type.tensorType
    dtype = np.dtype(types.nptype_from_builtin(types.PROTO_TO_BUILTIN_TYPE[t.dataType]))
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions]
    return dtype, None if None in dims else tuple(dims)


def _compute(value):
    """The executor's representation: fp16 as float32 holding fp16 values, everything else as is."""
    if isinstance(value, np.ndarray | np.generic) and value.dtype == FP16:
        return value.astype(np.float32)
    return value


class MILProgram:
    """The functions of one ML program package, runnable with NumPy."""

    def __init__(self, package: Path):
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext

        self.package = Path(package)
        spec = ct.utils.load_spec(str(self.package))
        if spec.WhichOneof("Type") != "mlProgram":
            raise EdgekvError(f"{package}: not an ML program (the NumPy executor runs ML programs only)")
        self._context = TranscriptionContext(str(self.package / "Data" / "com.apple.CoreML" / "weights"))
        self._blobs: dict[tuple[str, int], np.ndarray] = {}  # weights shared between functions load once
        self._folded: dict[tuple[int, ...], np.ndarray] = {}  # dequantized weights, by their inputs' identity
        self.functions = {name: self._load_function(name, f) for name, f in spec.mlProgram.functions.items()}

    def _value(self, value_spec):
        from coremltools.converters.mil.frontend.milproto.load import _load_value

        if value_spec.WhichOneof("value") != "blobFileValue":
            return _compute(_load_value(self._context, value_spec))
        key = (value_spec.blobFileValue.fileName, value_spec.blobFileValue.offset)
        if key not in self._blobs:
            self._blobs[key] = _compute(_load_value(self._context, value_spec))
        return self._blobs[key]

    def _load_function(self, fname: str, f) -> Function:
        if len(f.block_specializations) != 1:
            raise EdgekvError(
                f"function '{fname}' has {len(f.block_specializations)} block specializations; "
                "the NumPy executor runs programs with one"
            )
        block = f.block_specializations[f.opset]
        inputs, states = {}, {}
        for i in f.inputs:
            if i.type.WhichOneof("type") == "stateType":
                states[i.name] = _tensor_type(i.type.stateType.wrappedType)
            else:
                inputs[i.name] = _tensor_type(i.type)
        consts, ops = {}, []
        for op in block.operations:
            where = f"op '{op.type}' ({op.outputs[0].name if op.outputs else op.type}) in function '{fname}'"
            if op.type == "const":
                consts[op.outputs[0].name] = self._value(op.attributes["val"])
                continue
            if op.type not in OPS and op.type not in STATE_OPS:
                raise EdgekvError(f"{where}: the NumPy executor does not implement '{op.type}'")
            if len(op.blocks):
                raise EdgekvError(f"{where}: nested blocks (control flow) are not implemented")
            fn = OPS.get(op.type)
            known = set(inspect.signature(fn).parameters) if fn else {"input", "data"}
            if set(op.inputs) - known:
                raise EdgekvError(f"{where}: input(s) {sorted(set(op.inputs) - known)} not implemented")

            def arg(a):
                if a.name:
                    return ("val", consts[a.name]) if a.name in consts else ("ref", a.name)
                return ("val", self._value(a.value))

            args = {k: [arg(a) for a in v.arguments] for k, v in op.inputs.items()}
            args = {k: v if k == "values" else v[0] for k, v in args.items()}  # only concat/stack are variadic
            outputs = [(o.name, *_tensor_type(o.type)) for o in op.outputs]
            new = _Op(op.type, op.outputs[0].name if op.outputs else op.type, args, outputs, fn)
            if op.type.startswith("constexpr_"):  # weights: computed once, at load, as Core ML does
                consts[new.name] = self._fold(new, fname)
            else:
                ops.append(new)
        declared = {name: dtype for op in ops for name, dtype, _ in op.outputs}
        _plan_in_place(ops, block.outputs)
        for op in ops:
            _prepare(op)
        return Function(fname, inputs, states, ops, {name: declared[name] for name in block.outputs})

    def _fold(self, op: _Op, function: str) -> np.ndarray:
        key = tuple(id(v[1]) for v in op.args.values())
        if key not in self._folded:
            try:
                value = op.fn(**{k: v[1] for k, v in op.args.items()})
            except Unsupported as e:
                raise EdgekvError(
                    f"op '{op.type}' ({op.name}) in function '{function}': {e} is not implemented by the NumPy executor"
                ) from None
            ((_, dtype, shape),) = op.outputs
            with np.errstate(over="ignore"):
                self._folded[key] = _conform(value, dtype, shape, op, function)
        return self._folded[key]

    def make_state(self, function: str) -> dict[str, np.ndarray]:
        """Fresh state buffers for a function (Core ML leaves their content undefined; here zeros), in the
        executor's representation: an fp16 state is a float32 array holding fp16 values."""
        states = self.functions[function].states
        return {name: _compute(np.zeros(shape, dtype)) for name, (dtype, shape) in states.items()}

    def run(self, function: str, inputs: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> dict:
        """Run one function; `state` arrays are read and replaced in place. Outputs in their declared dtype."""
        f = self.functions[function]
        env: dict[str, Any] = {}
        for name, (dtype, shape) in f.inputs.items():
            value = np.asarray(inputs[name])
            if value.dtype != dtype or value.shape != shape:
                raise EdgekvError(
                    f"input '{name}' of '{function}' must be {dtype}{list(shape)}, got {value.dtype}{list(value.shape)}"
                )
            env[name] = _compute(value)
        for name, (dtype, shape) in f.states.items():
            held = np.float32 if dtype == FP16 else dtype
            if state[name].dtype != held or state[name].shape != shape:
                raise EdgekvError(f"state '{name}' of '{function}' must be {np.dtype(held)}{list(shape)} (make_state)")

        with np.errstate(over="ignore"):  # past 65504 an fp16 result is inf, as in fp16
            for op in f.ops:
                self._step(op, function, env, state)
        return {name: env[name].astype(dtype) for name, dtype in f.outputs.items()}

    @staticmethod
    def _step(op: _Op, function: str, env: dict, state: dict) -> None:
        if op.type == "read_state":  # the array itself where nothing could see it change (`_plan_in_place`)
            name = op.args["input"][1]
            result = state[name] if op.in_place else state[name].copy()
        elif op.type == "write_state":
            (kind, data), name = op.args["data"], op.args["input"][1]
            data = env[data] if kind == "ref" else data
            if data is not state[name]:  # else written in place already
                state[name][...] = data
            return
        else:
            kwargs = dict(op.fixed)
            for key, name in op.refs:
                kwargs[key] = env[name]
            for key, items in op.lists:
                kwargs[key] = [env[v] if kind == "ref" else v for kind, v in items]
            try:
                result = op.fn(**kwargs)
            except Unsupported as e:
                raise EdgekvError(
                    f"op '{op.type}' ({op.name}) in function '{function}': {e} is not implemented by the NumPy executor"
                ) from None
        results = result if isinstance(result, list) else [result]  # split has one output per piece
        if len(results) != len(op.outputs):
            raise EdgekvError(
                f"op '{op.type}' ({op.name}) in '{function}' gave {len(results)} outputs, declared {len(op.outputs)}"
            )
        for (name, dtype, shape), value in zip(op.outputs, results, strict=True):
            env[name] = _conform(np.asarray(value), dtype, shape, op, function)


def _prepare(op: _Op) -> None:
    """Split an op's arguments once into those known at load and those read per call."""
    for key, arg in op.args.items():
        if isinstance(arg, list):
            op.lists.append((key, arg))
        elif arg[0] == "ref":
            op.refs.append((key, arg[1]))
        else:
            op.fixed[key] = arg[1]
    if op.type == "slice_update" and op.in_place:
        op.fixed["in_place"] = True


def _plan_in_place(ops: list[_Op], outputs) -> None:
    """Mark each slice_update that may write into its input, and each read_state that may return the caller's
    array itself rather than a copy. Memory is tracked by root: a view (VIEWS) shares its input's root, an op's
    result is a root of its own, inputs and constants have none and are never written. A slice_update writes in
    place when no value sharing its input's root is read after it; a read_state shares the state's array when
    the state is read once and written back, and no value sharing it is read after that write (which writes
    into the array) or written in place after it."""

    def refs(a):
        return [r for x in a for r in refs(x)] if isinstance(a, list) else ([a[1]] if a[0] == "ref" else [])

    last = {}  # value -> index of the last op reading it (the function's outputs: read after every op)
    for i, op in enumerate(ops):
        for v in refs(list(op.args.values())):
            last[v] = i
    for name in outputs:
        last[name] = len(ops)
    reads = [op.args["input"][1] for op in ops if op.type == "read_state"]
    written = {op.args["input"][1]: i for i, op in enumerate(ops) if op.type == "write_state"}
    copied = {name for name in reads if reads.count(name) > 1 or name not in written}
    while True:
        known = set(copied)
        root: dict[str, tuple] = {}
        for i, op in enumerate(ops):
            here, op.in_place = ("op", i), False
            if op.type == "read_state":
                name = op.args["input"][1]
                op.in_place = name not in copied
                here = ("state", name) if op.in_place else here
            elif op.type in VIEWS or op.type == "slice_update":
                x = op.args.get("x") or op.args.get("input") or ("val", None)
                shared = root.get(x[1]) if x[0] == "ref" else None
                if op.type in VIEWS:
                    here = shared
                elif shared is not None and all(last.get(v, -1) <= i for v, r in root.items() if r == shared):
                    op.in_place, here = True, shared
                    if shared[0] == "state" and i > written[shared[1]]:
                        copied.add(shared[1])
            for name, _, _ in op.outputs:
                if here is not None:
                    root[name] = here
        stale = {r[1] for v, r in root.items() if r[0] == "state" and last.get(v, -1) > written[r[1]]}
        copied |= stale
        if copied == known:
            return  # else a state was found to need its copy: plan again


def round_fp16(v: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest fp16 value (ties to even), as float32: what
    `v.astype(float16).astype(float32)` gives, bit for bit (tests/test_mil_executor.py), 2.3 times as fast on
    large arrays, where NumPy's conversion to fp16 is not vectorized. Small arrays take NumPy's conversion."""
    if v.size < 4096:
        return v.astype(FP16).astype(np.float32)
    u = v.view(np.uint32)
    a = u & np.uint32(0x7FFFFFFF)  # the magnitude's bits
    r = a + ((a >> np.uint32(13)) & np.uint32(1))  # ties to even on the 13 bits fp16 drops
    r += np.uint32(0x0FFF)
    r &= np.uint32(0xFFFFE000)
    r[r > 0x477FE000] = 0x7F800000  # past 65504: inf
    small = (a < 0x38800000) & (a != 0)  # below fp16's smallest normal: multiples of 2^-24
    if small.any():
        r[small] = (np.rint(np.abs(v[small]) * np.float32(2**24)) * np.float32(2**-24)).view(np.uint32)
    nan = a > 0x7F800000
    if nan.any():
        payload = a[nan] & np.uint32(0x007FE000)  # cut to fp16's 10 bits, kept nonzero, as the conversion does
        payload[payload == 0] = 0x2000
        r[nan] = payload | np.uint32(0x7F800000)
    r |= u & np.uint32(0x80000000)
    return r.view(np.float32)


def _conform(value: np.ndarray, dtype: np.dtype, shape: tuple | None, op: _Op, function: str) -> np.ndarray:
    """Round an fp16 result to fp16; check every result against the program's declared dtype and shape."""
    if dtype == FP16:
        if value.dtype != np.float32:
            raise EdgekvError(f"op '{op.type}' ({op.name}) in '{function}' gave {value.dtype} for an fp16 output")
        if op.type not in MOVES:  # past 65504 it is inf, as in fp16 (the caller ignores the overflow warning)
            value = round_fp16(value)
    elif value.dtype != dtype:
        raise EdgekvError(f"op '{op.type}' ({op.name}) in '{function}' gave {value.dtype}, declared {dtype}")
    if shape is not None and value.shape != shape:
        raise EdgekvError(
            f"op '{op.type}' ({op.name}) in '{function}' gave shape {list(value.shape)}, declared {list(shape)}"
        )
    return value
