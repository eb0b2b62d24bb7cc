"""The NumPy MIL executor, op by op: each op it implements, in a one-op Core ML program written by
coremltools, against an independent PyTorch computation on random inputs; fp16 rounding; the state
ops; and loud failures for what it does not implement."""

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from runtimes.errors import EdgekvError  # noqa: E402
from runtimes.mil_executor import MILProgram  # noqa: E402

RNG = np.random.default_rng(0)
F16, F32, I32, BOOL = types.fp16, types.fp32, types.int32, types.bool
NP = {F16: np.float16, F32: np.float32, I32: np.int32, BOOL: np.bool_}


def build(tmp_path, specs, body, states=()) -> MILProgram:
    """Save a program of `body(*inputs)` as an iOS 18 .mlpackage, unoptimized, and load it in the executor."""
    inputs = [mb.TensorSpec(shape=s, dtype=d) for s, d in specs] + [
        mb.StateTensorSpec(shape=s, dtype=d) for s, d in states
    ]
    prog = mb.program(input_specs=inputs, opset_version=ct.target.iOS18)(body)
    model = ct.convert(
        prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, pass_pipeline=ct.PassPipeline.EMPTY
    )
    path = tmp_path / "p.mlpackage"
    model.save(str(path))
    return MILProgram(path)


def run(tmp_path, specs, body, *arrays) -> np.ndarray:
    program = build(tmp_path, specs, body)
    f = program.functions["main"]
    out = program.run("main", dict(zip(f.inputs, arrays, strict=True)), {})
    return next(iter(out.values()))


def rand(shape, dtype, low=-4.0, high=4.0):
    if dtype is I32:
        return RNG.integers(-20, 20, shape).astype(np.int32)
    if dtype is BOOL:
        return RNG.random(shape) < 0.5
    return RNG.uniform(low, high, shape).astype(NP[dtype])


def t(a):
    return torch.from_numpy(np.asarray(a))


def assert_fp16_close(got, exact):
    """Within one fp16 step of the exact (float64) result: the rounding of an fp32 accumulation."""
    exact = np.asarray(exact, np.float64)
    assert got.dtype == np.float16
    assert (np.abs(got.astype(np.float64) - exact) <= np.spacing(np.abs(exact).astype(np.float16))).all()


# Elementwise ops on fp16 must give exactly IEEE fp16 arithmetic: torch's float16 ops are the judge.
BINARY = {
    "add": (mb.add, torch.add),
    "sub": (mb.sub, torch.sub),
    "mul": (mb.mul, torch.mul),
    "real_div": (mb.real_div, torch.div),
    "maximum": (mb.maximum, torch.maximum),
    "minimum": (mb.minimum, torch.minimum),
}


@pytest.mark.parametrize("op", BINARY)
@pytest.mark.parametrize("dtype", [F16, F32])
def test_binary_float_ops_exactly(tmp_path, op, dtype):
    x, y = rand((3, 1, 5), dtype), rand((4, 5), dtype, 0.5, 4.0)  # broadcasting; y > 0 for real_div
    mil_op, torch_op = BINARY[op]
    got = run(tmp_path, [(x.shape, dtype), (y.shape, dtype)], lambda a, b: mil_op(x=a, y=b), x, y)
    assert got.dtype == NP[dtype]
    np.testing.assert_array_equal(got, torch_op(t(x), t(y)).numpy())


def test_fp16_rounds_to_nearest_even_and_overflows_to_inf(tmp_path):
    x = np.array([2048, 2050, 60000, -60000, 1], np.float16)
    y = np.array([1, 1, 10000, -10000, 2**-11], np.float16)  # 2049 and 2051 are ties; 70000 > 65504
    got = run(tmp_path, [((5,), F16), ((5,), F16)], lambda a, b: mb.add(x=a, y=b), x, y)
    np.testing.assert_array_equal(got, np.array([2048, 2052, np.inf, -np.inf, 1], np.float16))


def test_round_fp16_is_numpys_conversion_bit_for_bit():
    """The executor's own rounding of large arrays against NumPy's float32 -> float16 -> float32, bit for bit, on
    every class of float32: random bit patterns (all exponents, NaN payloads, both signs) and the edges (ties either
    way, the largest fp16, what rounds to inf, subnormals and what rounds to 0). An exhaustive run over all 2^32
    patterns also matched (docs/validation.md)."""
    from runtimes.mil_executor import round_fp16

    edges = [0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, np.inf, -np.inf, np.nan, 2**-14, 2**-24, 2**-25, 3 * 2**-26]
    edges += [1 + 2**-11, 1 + 3 * 2**-11, 2049.0, 2051.0, 5.960464477539063e-08, 1e-10, -1e-10]
    bits = RNG.integers(0, 2**32, 2**22, dtype=np.uint64).astype(np.uint32)
    v = np.concatenate([bits.view(np.float32), np.array(edges, np.float32), -np.array(edges, np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        want = v.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(round_fp16(v).view(np.uint32), want.view(np.uint32))


def test_every_intermediate_fp16_result_is_rounded(tmp_path):
    x, y = np.array([2048, 1, 40000], np.float16), np.array([1, 2**-11, 40000], np.float16)
    body = lambda a, b: mb.sub(x=mb.add(x=a, y=b), y=a)  # noqa: E731  (x + y) - x, in fp16
    got = run(tmp_path, [((3,), F16), ((3,), F16)], body, x, y)
    np.testing.assert_array_equal(got, np.array([0, 0, np.inf], np.float16))  # fp32 would give [1, 2**-11, 40000]


def test_floor_div_of_negative_integers(tmp_path):
    x, y = rand((50,), I32), RNG.choice([-7, -3, 2, 5], 50).astype(np.int32)
    got = run(tmp_path, [((50,), I32), ((50,), I32)], lambda a, b: mb.floor_div(x=a, y=b), x, y)
    np.testing.assert_array_equal(got, torch.div(t(x), t(y), rounding_mode="floor").numpy())


COMPARE = {
    "equal": (mb.equal, torch.eq),
    "not_equal": (mb.not_equal, torch.ne),
    "less": (mb.less, torch.lt),
    "less_equal": (mb.less_equal, torch.le),
    "greater": (mb.greater, torch.gt),
    "greater_equal": (mb.greater_equal, torch.ge),
}


@pytest.mark.parametrize("op", COMPARE)
def test_comparisons(tmp_path, op):
    x, y = rand((6, 7), I32), rand((7,), I32)
    mil_op, torch_op = COMPARE[op]
    got = run(tmp_path, [(x.shape, I32), (y.shape, I32)], lambda a, b: mil_op(x=a, y=b), x, y)
    np.testing.assert_array_equal(got, torch_op(t(x), t(y)).numpy())


def test_logical_ops_and_select(tmp_path):
    p, q, r = rand((4, 5), F16), rand((4, 5), F16), rand((4, 5), F16)  # Core ML I/O has no bool: compare inside
    x, y = rand((4, 5), F16), rand((4, 5), F16)

    def body(p, q, r, x, y):
        a, b, c = (mb.greater(x=v, y=np.float16(0)) for v in (p, q, r))
        cond = mb.logical_or(x=mb.logical_and(x=a, y=b), y=mb.logical_not(x=c))
        return mb.select(cond=cond, a=x, b=y)

    got = run(tmp_path, [((4, 5), F16)] * 5, body, p, q, r, x, y)
    a, b, c = t(p) > 0, t(q) > 0, t(r) > 0
    np.testing.assert_array_equal(got, torch.where((a & b) | ~c, t(x), t(y)).numpy())


def test_clip(tmp_path):
    x = rand((30,), F16)
    got = run(tmp_path, [((30,), F16)], lambda a: mb.clip(x=a, alpha=np.float16(-1.5), beta=np.float16(2.25)), x)
    np.testing.assert_array_equal(got, torch.clamp(t(x), -1.5, 2.25).numpy())


@pytest.mark.parametrize("src,dst", [(F16, "int32"), (I32, "fp16"), (I32, "bool"), (F32, "fp16"), (I32, "int16")])
def test_cast(tmp_path, src, dst):
    x = rand((40,), src) * (300 if src is I32 else 1)
    got = run(tmp_path, [((40,), src)], lambda a: mb.cast(x=a, dtype=dst), x)
    want = {"int32": torch.int32, "fp16": torch.float16, "bool": torch.bool, "int16": torch.int16}[dst]
    np.testing.assert_array_equal(got, t(x).to(want).numpy())  # float -> int truncates toward zero


def test_cast_out_of_range_fails_loudly(tmp_path):
    x = np.array([40000], np.int32)
    with pytest.raises(EdgekvError, match=r"op 'cast' .* in function 'main': values outside int16's range"):
        run(tmp_path, [((1,), I32)], lambda a: mb.cast(x=a, dtype="int16"), x)


def test_shape_ops(tmp_path):
    x, y = rand((2, 3, 4), F16), rand((2, 5, 4), F16)

    def body(a, b):
        cat = mb.concat(values=[a, b], axis=1)  # [2, 8, 4]
        st = mb.stack(values=[cat, cat], axis=-1)  # [2, 8, 4, 2]
        r = mb.reshape(x=st, shape=[0, -1, 4, 1])  # 0 keeps a dim when the rank is kept: [2, 16, 4, 1]
        tr = mb.transpose(x=r, perm=[2, 0, 1, 3])  # [4, 2, 16, 1]
        return mb.expand_dims(x=tr, axes=[-2])  # [4, 2, 16, 1, 1] (Core ML allows rank 5 at most)

    got = run(tmp_path, [(x.shape, F16), (y.shape, F16)], body, x, y)
    cat = torch.cat([t(x), t(y)], 1)
    want = torch.stack([cat, cat], -1).reshape(2, -1, 4, 1).permute(2, 0, 1, 3)[..., None, :]
    np.testing.assert_array_equal(got, want.numpy())


def test_split_and_squeeze(tmp_path):
    x = rand((6, 4, 1), F16)
    program = build(
        tmp_path,
        [(x.shape, F16)],
        lambda a: (
            *mb.split(x=a, num_splits=3, axis=0),
            *mb.split(x=mb.squeeze(x=a, axes=[-1]), split_sizes=[1, 3], axis=1),
        ),
    )
    got = list(program.run("main", {"a": x}, {}).values())
    want = [*torch.chunk(t(x), 3, 0), *torch.split(t(x).squeeze(-1), [1, 3], 1)]
    assert len(got) == 5
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w.numpy())


def test_slice_by_index_with_masks_and_strides(tmp_path):
    x = rand((5, 6, 7), F32)
    body = lambda a: mb.slice_by_index(  # noqa: E731
        x=a,
        begin=[1, 0, -5],
        end=[4, 0, 7],
        stride=[2, 1, 2],
        begin_mask=[False, True, False],
        end_mask=[False, True, False],
        squeeze_mask=[False, False, False],
    )
    np.testing.assert_array_equal(run(tmp_path, [(x.shape, F32)], body, x), t(x)[1:4:2, :, -5:7:2].numpy())
    squeeze = lambda a: mb.slice_by_index(  # noqa: E731
        x=a, begin=[2, 1, 0], end=[3, 5, 0], end_mask=[False, False, True], squeeze_mask=[True, False, False]
    )
    np.testing.assert_array_equal(run(tmp_path, [(x.shape, F32)], squeeze, x), t(x)[2, 1:5, :].numpy())


def test_slice_update_at_a_dynamic_begin(tmp_path):
    """slice_update with its begin an input (a cache slot): a copy of x with that slice replaced, x untouched."""
    x, u = rand((2, 3, 8, 4), F16), rand((2, 3, 1, 4), F16)

    def body(a, b, pos):
        begin = mb.concat(values=[np.zeros(2, np.int32), pos, np.zeros(1, np.int32)], axis=0)
        slot = mb.squeeze(x=pos)  # end from scalars, as coremltools writes it: a concat of rank-0 values
        end = mb.concat(values=[np.int32(2), np.int32(3), mb.add(x=slot, y=1), np.int32(4)], axis=0)
        return mb.slice_update(x=a, update=b, begin=begin, end=end)

    program = build(tmp_path, [(x.shape, F16), (u.shape, F16), ((1,), I32)], body)
    ((op,),) = [[o for o in program.functions["main"].ops if o.type == "slice_update"]]
    assert not op.in_place  # its x is the function's input: never written
    for slot in (0, 5, 7):
        want = t(x).clone()
        want[:, :, slot : slot + 1] = t(u)
        out = program.run("main", {"a": x, "b": u, "pos": np.array([slot], np.int32)}, {})
        np.testing.assert_array_equal(next(iter(out.values())), want.numpy())
    with pytest.raises(EdgekvError, match=r"slice_update.*an update of shape \[2, 3, 1, 4\] for a slice of shape "):
        program.run("main", {"a": x, "b": u, "pos": np.array([8], np.int32)}, {})


def test_slice_update_of_the_state_is_in_place_only_when_nothing_reads_it_later(tmp_path):
    """A decode step's cache write: read_state -> slice_update -> write_state writes the state's array in place;
    when an earlier view of the state is read after the update, the update copies, and both give the same values."""
    u, initial = rand((1, 4), F16), rand((3, 4), F16)

    def program_reading(read_after):
        def body(b, s):
            cache = mb.read_state(input=s)
            row = mb.slice_by_index(x=cache, begin=[0, 0], end=[1, 4])  # a view of the state, read before or after
            early = mb.mul(x=row, y=np.float16(3)) if not read_after else None
            new = mb.slice_update(x=cache, update=b, begin=[0, 0], end=[1, 4])
            mb.coreml_update_state(state=s, value=new)
            return mb.mul(x=row, y=np.float16(3)) if read_after else early

        return build(tmp_path, [(u.shape, F16)], body, states=[((3, 4), F16)])

    results = []
    for read_after in (False, True):
        program = program_reading(read_after)
        ops = [o for o in program.functions["main"].ops if o.type == "slice_update"]
        assert [o.in_place for o in ops] == [not read_after]
        state = program.make_state("main")
        state["s"][...] = initial
        before = state["s"].copy()
        out = next(iter(program.run("main", {"b": u}, state).values()))
        np.testing.assert_array_equal(out, (t(before[:1]).half() * 3).numpy())  # the row as it was
        np.testing.assert_array_equal(state["s"], np.concatenate([u.astype(np.float32), before[1:]]))
        results.append(out)
    np.testing.assert_array_equal(*results)


def test_gather_rows_and_columns(tmp_path):
    x, rows = rand((10, 6), F16), np.array([[3, 0], [9, -1]], np.int32)  # negative counts from the end
    got = run(tmp_path, [(x.shape, F16), (rows.shape, I32)], lambda a, i: mb.gather(x=a, indices=i, axis=0), x, rows)
    np.testing.assert_array_equal(got, t(x)[t(rows % 10).long()].numpy())
    cols = np.array([5, 1, 1], np.int32)
    got = run(tmp_path, [(x.shape, F16), (cols.shape, I32)], lambda a, i: mb.gather(x=a, indices=i, axis=1), x, cols)
    np.testing.assert_array_equal(got, t(x)[:, t(cols).long()].numpy())


def test_gather_out_of_range_fails_loudly(tmp_path):
    x, idx = rand((4, 3), F32), np.array([4], np.int32)
    with pytest.raises(EdgekvError, match=r"op 'gather' .* in function 'main': an index outside"):
        run(tmp_path, [(x.shape, F32), (idx.shape, I32)], lambda a, i: mb.gather(x=a, indices=i, axis=0), x, idx)


def test_linear_in_fp16_with_fp32_accumulation(tmp_path):
    x, w, b = rand((2, 3, 64), F16), rand((48, 64), F16, -0.5, 0.5), rand((48,), F16)
    got = run(tmp_path, [(x.shape, F16)], lambda a: mb.linear(x=a, weight=w, bias=b), x)
    exact = torch.nn.functional.linear(t(x).double(), t(w).double(), t(b).double())
    assert_fp16_close(got, exact.numpy())


@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True)])
def test_matmul_transposes(tmp_path, tx, ty):
    x, y = rand((3, 8, 5), F32), rand((3, 5, 6), F32)
    x_in = np.swapaxes(x, -1, -2).copy() if tx else x
    y_in = np.swapaxes(y, -1, -2).copy() if ty else y
    got = run(
        tmp_path,
        [(x_in.shape, F32), (y_in.shape, F32)],
        lambda a, b: mb.matmul(x=a, y=b, transpose_x=tx, transpose_y=ty),
        x_in,
        y_in,
    )
    np.testing.assert_allclose(got, torch.matmul(t(x).double(), t(y).double()).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [F16, F32])
def test_reductions_and_activations(tmp_path, dtype):
    x = rand((2, 4, 33), dtype)
    cases = {
        "reduce_mean": (lambda a: mb.reduce_mean(x=a, axes=[-1], keep_dims=True), lambda v: v.mean(-1, keepdim=True)),
        "reduce_sum": (lambda a: mb.reduce_sum(x=a, axes=[1], keep_dims=False), lambda v: v.sum(1)),
        "softmax": (lambda a: mb.softmax(x=a, axis=-1), lambda v: torch.softmax(v, -1)),
        "silu": (lambda a: mb.silu(x=a), torch.nn.functional.silu),
        "reduce_max": (
            lambda a: mb.reduce_max(x=mb.abs(x=a), axes=[0, 2], keep_dims=False),
            lambda v: v.abs().amax(dim=(0, 2)),
        ),
        "inverse": (lambda a: mb.inverse(x=mb.abs(x=a), epsilon=NP[dtype](0.5)), lambda v: 1 / (v.abs() + 0.5)),
        "rsqrt": (lambda a: mb.rsqrt(x=mb.mul(x=a, y=a), epsilon=NP[dtype](1e-3)), lambda v: torch.rsqrt(v * v + 1e-3)),
    }
    for name, (body, exact) in cases.items():
        got = run(tmp_path / name, [(x.shape, dtype)], body, x)
        if dtype is F16:  # the product a*a is rounded to fp16 before rsqrt, as the program says
            want = (
                exact(t(x).double())
                if name != "rsqrt"
                else torch.rsqrt((t(x) * t(x)).double() + float(np.float16(1e-3)))
            )
            assert_fp16_close(got, want.numpy())
        else:
            np.testing.assert_allclose(got, exact(t(x).double()).numpy(), rtol=2e-6, atol=1e-7, err_msg=name)


def test_softmax_with_minus_inf_mask(tmp_path):
    x = rand((3, 6), F16)
    x[:, 4:] = -np.inf
    got = run(tmp_path, [(x.shape, F16)], lambda a: mb.softmax(x=a, axis=-1), x)
    assert (got[:, 4:] == 0).all()
    assert_fp16_close(got, torch.softmax(t(x).double(), -1).numpy())


def test_state_is_read_and_written_across_calls(tmp_path):
    def body(x, s):
        total = mb.add(x=mb.read_state(input=s), y=x)
        mb.coreml_update_state(state=s, value=total)
        return mb.mul(x=total, y=np.float16(2))

    program = build(tmp_path, [((2, 3), F16)], body, states=[((2, 3), F16)])
    state = program.make_state("main")
    assert list(state) == ["s"] and state["s"].dtype == np.float32  # fp16 values, held as every fp16 tensor
    x = rand((2, 3), F16)
    total = torch.zeros(2, 3, dtype=torch.float16)
    for _ in range(3):
        out = next(iter(program.run("main", {"x": x}, state).values()))
        total = total + t(x)  # fp16 arithmetic, rounded after each call as the state is fp16
        np.testing.assert_array_equal(state["s"], total.numpy())
        np.testing.assert_array_equal(out, (total * 2).numpy())
    state["s"][...] = 0  # a fresh state starts the sum again
    np.testing.assert_array_equal(next(iter(program.run("main", {"x": x}, state).values())), (t(x) * 2).numpy())


def test_an_op_the_executor_lacks_fails_with_its_name(tmp_path):
    with pytest.raises(
        EdgekvError,
        match=r"op 'erf' \(\w+\) in function 'main': the NumPy executor does not "
        r"implement 'erf'",
    ):
        build(tmp_path, [((4,), F32)], lambda a: mb.erf(x=mb.add(x=a, y=np.float32(1))))


def test_an_attribute_value_it_lacks_fails_with_the_op(tmp_path):
    x = rand((2, 3), F32)
    with pytest.raises(EdgekvError, match=r"op 'concat' \(\w+\) in function 'main': interleave=True is not"):
        run(tmp_path, [(x.shape, F32)], lambda a: mb.concat(values=[a, a], axis=1, interleave=True), x)


def test_inputs_are_checked(tmp_path):
    program = build(tmp_path, [((2, 3), F16)], lambda a: mb.add(x=a, y=a))
    with pytest.raises(EdgekvError, match=r"input 'a' of 'main' must be float16\[2, 3\], got float32\[2, 3\]"):
        program.run("main", {"a": np.zeros((2, 3), np.float32)}, {})
