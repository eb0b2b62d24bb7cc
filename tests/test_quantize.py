"""`edgekv export --quantize`: every target, int8 and int4, on a tiny random model (weights that never were
4-bit) and on SmolLM2; validated by perplexity and top-1 against fp32, and measured for size."""

import collections
import copy
import json
import random
import sys

import numpy as np
import pytest
import torch

from exporter.loaders import build_model, load_checkpoint
from exporter.quantize import OffsetEmbedding, OffsetLinear, affine_int4, affine_round_trip, split_affine
from exporter.targets.executorch import XnnpackOffsetLinear
from exporter.validate import QUANT_BOUNDS
from tests.conftest import RUNNABLE, edgekv, export_all, make_tiny, one_line_error, two_at_a_time

SCHEMES = ("int8", "int4")
TARGETS = (*RUNNABLE, "coreml")
SIZE_GOAL = {"int8": 0.30, "int4": 0.20}  # x the unquantized fp32 artifact of the same target


def q4_1_weights(rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as llama.cpp's Q4_1 stores them: per group of 32, codes 0..15 (both ends used), a scale and
    a float minimum."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, groups, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(rows, groups, 1, generator=g) * 0.01 + 1e-3
    low = (torch.rand(rows, groups, 1, generator=g) - 0.5) * 0.1
    return (codes * scale + low).reshape(rows, groups * 32), codes


def test_affine_int4_returns_q4_1_weights_exactly():
    w, codes = q4_1_weights(48, 4)
    q, scale, zero = affine_int4(w, 32)
    assert torch.equal(q.reshape(48, 4, 32).long(), codes)
    assert (affine_round_trip(w, 32) - w).abs().max().item() < 1e-7
    # The symmetric half lies on the grid scale * (-8 .. 7) with -8 * scale always present.
    sym, offset = split_affine(w, 32)
    steps = sym.reshape(48, 4, 32) / scale[..., None]
    assert (steps - steps.round()).abs().max().item() < 1e-4
    assert steps.round().amin(-1).eq(-8).all() and steps.round().amax(-1).eq(7).all()
    assert (sym.reshape(48, 4, 32) + offset[..., None] - w.reshape(48, 4, 32)).abs().max().item() < 1e-7


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_executorch_packs_a_big_table_a_block_of_rows_at_a_time(monkeypatch, scheme, kind):
    """A table past executorch.ROWS rows is quantized a block at a time (a 128k-row vocabulary's float temporaries
    are 3.4 GB) and joined: the same codes, scales and outputs as quantizing it whole."""
    pytest.importorskip("torchao")
    from exporter.quantize import Quantization
    from exporter.targets import executorch

    torch.manual_seed(0)
    table = torch.nn.Linear(64, 300) if kind == "linear" else torch.nn.Embedding(300, 64)
    table = table.to(torch.bfloat16)  # the checkpoint's dtype, as loaders.build_model hands it over
    x = torch.randn(3, 64) if kind == "linear" else torch.tensor([[0, 127, 128, 255, 256, 299]])
    packed = {}
    for rows in (1000, 128):  # whole, then three blocks (the last one short)
        monkeypatch.setattr(executorch, "ROWS", rows)
        packed[rows] = executorch.pack(copy.deepcopy(table), Quantization(scheme))
    whole, blocks = packed[1000].state_dict(), packed[128].state_dict()
    assert whole.keys() == blocks.keys()
    for name, tensor in whole.items():
        for part in getattr(tensor, "tensor_data_names", [None]):
            a, b = (getattr(t, part) if part else t for t in (tensor, blocks[name]))
            assert a.shape[0] == 300, (name, part, a.shape)  # every row, scale and offset is there once
            assert torch.equal(a, b), (name, part)
    assert torch.equal(packed[1000](x), packed[128](x))


def mapping_rss_kb(address: int) -> tuple[str, int]:
    """The file and resident size (KB) of this process's mapping that holds `address` (/proc/self/smaps)."""
    found = None
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            start, end = (int(x, 16) for x in head[0].split("-"))
            found = (head[5] if len(head) > 5 else "") if start <= address < end else None
        elif found is not None and head[0] == "Rss:":
            return found, int(head[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_coreml_codes_live_in_a_file_mapping_whose_pages_can_be_dropped():
    """Core ML's int4 codes (a byte a weight in coremltools, for the whole program) are a mapping of an unlinked
    file, resident only while read: after a read, `_drop_pages` hands them back, and they read the same again."""
    from exporter.quantize import Quantization
    from exporter.targets import coreml

    torch.manual_seed(0)
    weight = torch.randn(1024, 512)
    layer = coreml.BlockwiseLinear(weight, None, Quantization("int4"))
    expected = affine_int4(weight, 32)[0].to(torch.int8) - 8
    codes = layer.codes.numpy()
    name, _ = mapping_rss_kb(codes.ctypes.data)
    assert "edgekv-codes-" in name, name
    assert torch.equal(layer.codes, expected)  # reads every page
    assert mapping_rss_kb(codes.ctypes.data)[1] >= codes.nbytes // 1024
    coreml._drop_pages(codes)
    assert mapping_rss_kb(codes.ctypes.data)[1] == 0
    assert torch.equal(layer.codes, expected)
    coreml._drop_pages(codes.copy())  # not a mapped tensor's memory: left alone
    assert np.array_equal(codes, expected.numpy())


def with_offsets(model: torch.nn.Module, group: int, linear: type[OffsetLinear] = OffsetLinear) -> torch.nn.Module:
    """A copy whose linear layers and embedding carry affine int4 weights as symmetric weights + offsets
    (`linear`, OffsetEmbedding); a tied output projection keeps sharing both tensors with the lookup.
    Offsets are the modules named `offset`: the target's 4-bit quantizer must leave them alone."""
    model = copy.deepcopy(model)
    tied = model.lm_head.weight is model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not (tied and module is model.lm_head):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, linear(module, group))
    model.embed_tokens = OffsetEmbedding(model.embed_tokens, group)
    if tied:
        head = linear(model.lm_head, group)
        head.linear.weight, head.offset.weight = model.embed_tokens.table.weight, model.embed_tokens.offset.weight
        model.lm_head = head
    return model


@pytest.mark.parametrize("linear", [OffsetLinear, XnnpackOffsetLinear])
def test_offsets_compute_the_affine_weights(tmp_path, linear):
    """Symmetric weights + offsets (what ExecuTorch, ONNX and OpenVINO export; ExecuTorch's group sums as XNNPACK's
    mean) give the logits of the model whose weights were rounded in place, tied table and output projection
    included."""
    ckpt = load_checkpoint(
        make_tiny("llama", tmp_path / "hf", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    )
    model = build_model(ckpt, 2, 12, max_chunk=4)
    split = with_offsets(model, 32, linear)
    assert type(split.layers[0].mlp.down_proj) is linear
    assert split.lm_head.linear.weight is split.embed_tokens.table.weight
    rounded = build_model(ckpt, 2, 12, max_chunk=4)
    with torch.no_grad():
        for w in rounded.parameters():
            if w.ndim == 2:
                w.copy_(affine_round_trip(w, 32))
        tokens = torch.randint(0, model.cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
        a, b, c = (m(tokens, torch.tensor([0])) for m in (model, split, rounded))
    assert (b - c).abs().max().item() < 1e-5 * c.abs().max().item()
    assert (a - c).abs().max().item() > 1e-3 * c.abs().max().item()  # and rounding did change the logits


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tied-embedding Llama (hidden 64: one group of 32 splits every row) exported unquantized and with each
    scheme, and a text of random tokens, so the prediction changes with every position (the shipped text is all
    unknown words for this vocabulary)."""
    tmp = tmp_path_factory.mktemp("tinyq")
    folder = make_tiny("llama", tmp / "hf", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    rng = random.Random(0)
    text = tmp / "words.txt"
    text.write_text(" ".join(f"w{rng.randrange(128)}" for _ in range(300)))
    export_all(
        tmp / "out", "--model", str(folder), "--sink", "2", "--window", "12", "--chunk", "4", schemes=("none", *SCHEMES)
    )
    return tmp / "out", text


def quantized_pair(result: dict, scheme: str) -> dict:
    """The pair of the quantized run against the fp32 reference."""
    (pair,) = [p for p in result["pairs"] if p["a"] == "reference" and p["b"].endswith(f"-{scheme}")]
    return pair


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("target", TARGETS)
def test_tiny_quantized_export_validates(tiny, target, scheme):
    out, text = tiny
    manifest = json.loads((out / f"{target}-{scheme}" / "edgekv.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme
    caches = [t for t in manifest["state"] + manifest["inputs"] if t["role"] == "cache"]
    assert caches and {c["dtype"] for c in caches} == {manifest["quantization"]["cache_dtype"]}
    r = edgekv(
        "validate", str(out / f"{target}-{scheme}"), "--unquantized", str(out / target), "--text", str(text), "--json"
    )
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["ok"] and result["quantization"] == scheme and result["tokens"] == 2 + 3 * 12 + 4
    pair = quantized_pair(result, scheme)
    bound = QUANT_BOUNDS[scheme]
    assert pair["ppl_ratio"] <= 1 + bound["ppl_increase"] and pair["top1_agreement"] >= bound["top1"]
    # Really quantized (the logits moved), and by about what the scheme allows: measured int8 ~5e-3 and
    # int4 ~6e-2 of the logit scale on this model.
    assert {"int8": 1e-3, "int4": 1e-2}[scheme] < pair["rel_diff"] < {"int8": 2e-2, "int4": 2e-1}[scheme]


def test_validate_without_the_cross_check(tiny):
    """--no-cross-check (what a 1B+ model needs: the unquantized export holds the float model) leaves out the
    unquantized twin and says so; the reference (a layer at a time) gives the same pair as with the twin."""
    out, text = tiny
    runs = [
        edgekv("validate", str(out / "onnx-int4"), "--text", str(text), "--json", *flag)
        for flag in ((), ("--no-cross-check",))
    ]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    full, alone = (json.loads(r.stdout) for r in runs)
    assert [(p["a"], p["b"]) for p in alone["pairs"]] == [("reference", "onnx-int4")]
    assert alone["pairs"][0] == quantized_pair(full, "int4") and len(full["pairs"]) == 3
    assert alone["not_run"] == [
        "onnx: the onnx export to compare with was not made (--no-cross-check); pass --unquantized DIR"
    ]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_coreml_package_carries_quantized_weights(tiny, scheme):
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    out, _ = tiny
    spec = ct.utils.load_spec(str(out / f"coreml-{scheme}" / "model.mlpackage"))
    for name, f in spec.mlProgram.functions.items():
        ops = f.block_specializations[f.opset].operations
        consts = {o.outputs[0].name: o for o in ops if o.type == "const"}
        dequant = {o.outputs[0].name: o for o in ops if o.type == "constexpr_blockwise_shift_scale"}
        weights = [o.inputs["weight"].arguments[0].name for o in ops if o.type == "linear"]
        tables = [o.inputs["x"].arguments[0].name for o in ops if o.type == "gather"]
        assert len(weights) == 2 * 7 + 1 and set(weights) <= set(dequant), name  # every linear layer
        assert len(set(tables) & set(dequant)) == 1, name  # and the (tied) embedding table

        def tensor_type(op, key, consts=consts):  # an input given by name (a const op) or inline
            arg = op.inputs[key].arguments[0]
            return (consts[arg.name].outputs[0].type if arg.name else arg.value.type).tensorType

        for o in dequant.values():
            data, scale = tensor_type(o, "data"), tensor_type(o, "scale")
            # int8 symmetric; int4 affine: int4 codes (affine_int4's less 8) and a float16 zero point per block
            assert MIL_pb2.DataType.Name(data.dataType) == {"int8": "INT8", "int4": "INT4"}[scheme], name
            rows, cols = (d.constant.size for d in data.dimensions)
            assert [d.constant.size for d in scale.dimensions] == [rows, cols // 32]
            if scheme == "int4":
                offset = tensor_type(o, "offset")
                assert MIL_pb2.DataType.Name(offset.dataType) == "FLOAT16", name
                assert [d.constant.size for d in offset.dimensions] == [rows, cols // 32]


def test_int4_offsets_stay_float_and_every_other_product_is_4_bit(tiny):
    """Affine int4 on ONNX and OpenVINO: the 2 x 7 linear layers and the tied output projection are 4-bit
    products (MatMulNBits, bits 4, written as the weights were read: exporter/targets/nbits.py), each beside a float
    product of the input's group sums with its offsets [N, K / 32] (fp16 behind a Cast, or fp32 where the exporter
    folded that small Cast): a quantized offset would not give the affine weights back."""
    import onnx
    import openvino as ov

    out, _ = tiny
    graph = onnx.load(str(out / "onnx-int4" / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in nbits)
    tables = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def float_table(name):  # the float initializer a MatMul's weight is, through Cast / Transpose
        while name not in tables and name in producer and producer[name].op_type in ("Cast", "Transpose"):
            name = producer[name].input[0]
        t = tables.get(name)
        return t if t is not None and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) else None

    offsets = [float_table(n.input[1]) for n in graph.node if n.op_type == "MatMul" and float_table(n.input[1])]
    # one column per 32 inputs: hidden 64 -> 2, MLP width 128 -> 4 (down_proj)
    assert len(offsets) == 15 and sorted({min(t.dims) for t in offsets}) == [2, 4]
    ir = ov.Core().read_model(str(out / "openvino-int4" / "model.xml"))
    weights = [op.input_value(1).get_node() for op in ir.get_ordered_ops() if op.get_type_name() == "MatMul"]
    kept = [w for w in weights if w.get_type_name() == "Constant"]
    assert len(kept) == 15 and all(w.get_element_type() == ov.Type.f32 for w in kept)  # the offset products
    consts = [op for op in ir.get_ordered_ops() if op.get_type_name() == "Constant"]
    # int4 tables (and their zero points): the 15 products' weights and the embedding lookup's, compressed
    assert sum(op.get_element_type() == ov.Type.u4 for op in consts) >= 16


def pte_calls(path) -> dict[str, tuple[int, dict[str, int]]]:
    """Each method of a .pte: its delegate calls and how many times it calls each operator outside them."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes()).program
    calls = {}
    for plan in program.execution_plan:
        ops = collections.Counter(
            plan.operators[i.instr_args.op_index].name
            for chain in plan.chains
            for i in chain.instructions
            if type(i.instr_args).__name__ == "KernelCall"
        )
        calls[plan.name] = len(plan.delegates), dict(ops)
    return calls


def test_executorch_int4_keeps_the_partitions_of_fp32(tiny):
    """ExecuTorch int4: the offsets' group sums and their int8 products run inside XNNPACK
    (targets/executorch.py: XnnpackOffsetLinear), so decode and prefill are split into no more delegate calls than
    fp32's (this two-layer model: 4 against fp32's 5; 13 with the sums outside), and the only sums left outside are
    the rope frames' (one a layer), as in fp32."""
    out, _ = tiny
    fp32, int4 = (pte_calls(out / name / "model.pte") for name in ("executorch", "executorch-int4"))
    for method in ("decode", "prefill"):
        assert int4[method][0] == 4 and fp32[method][0] == 5, method
        assert int4[method][1]["aten::sum"] == fp32[method][1]["aten::sum"] == 2, method
        assert int4[method][1]["quantized_decomposed::embedding_4bit"] == 1


def test_group_size_that_does_not_split_the_rows_fails_before_any_work(tmp_path):
    folder = make_tiny("qwen2", tmp_path / "hf")  # hidden 48
    r = edgekv(
        "export", "--target", "onnx", "--model", str(folder), "--quantize", "int4", "--out", str(tmp_path / "out")
    )
    one_line_error(r, "--group-size 32 does not divide hidden_size 48")
    assert not (tmp_path / "out").exists()
    # int8 groups too: the advice for a width no group size divides is the unquantized export, not int8.
    r = edgekv("export", "--target", "onnx", "--model", str(folder), "--quantize", "int8", "--out", str(tmp_path / "o"))
    one_line_error(r, "no supported group size (32, 64, 128, 256) divides them; export with --quantize none")
    one_line_error(
        edgekv("export", "--target", "onnx", "--quantize", "int4", "--group-size", "16"),
        "argument --group-size: invalid choice: 16",
    )
    one_line_error(edgekv("export", "--target", "onnx", "--quantize", "int2"), "argument --quantize: invalid choice")


def test_validate_refuses_a_mismatched_unquantized_twin(tiny):
    out, text = tiny
    r = edgekv("validate", str(out / "onnx-int4"), "--unquantized", str(out / "onnx-int8"), "--text", str(text))
    one_line_error(r, "onnx-int8 is quantized; --unquantized takes an export made without --quantize")


# --- SmolLM2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smol_quantized(tmp_path_factory):
    return export_all(tmp_path_factory.mktemp("smolq"), "--window", "60", "--chunk", "16", schemes=SCHEMES)


@pytest.fixture(scope="session")
def smol_quantized_validated(smol_artifacts, smol_quantized) -> dict:
    """`edgekv validate` of every quantized SmolLM2 folder against its target's unquantized export, two at a time."""
    jobs = [(t, s) for t in TARGETS for s in SCHEMES]
    runs = two_at_a_time(
        [
            ("validate", str(smol_quantized / f"{t}-{s}"), "--unquantized", str(smol_artifacts / t), "--json")
            for t, s in jobs
        ]
    )
    return dict(zip(jobs, runs, strict=True))


def weight_bytes(folder) -> int:
    """Bytes of the model files (what quantization shrinks; the tokenizer is the same in every folder)."""
    manifest = json.loads((folder / "edgekv.json").read_text())
    paths = [folder / name for role, name in manifest["files"].items() if role in ("model", "weights", "external_data")]
    return sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("target", TARGETS)
def test_smollm2_quantized_validates_and_shrinks(
    smol_artifacts, smol_quantized, smol_quantized_validated, target, scheme
):
    folder = smol_quantized / f"{target}-{scheme}"
    r = smol_quantized_validated[target, scheme]
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["ok"] and result["tokens"] == 4 + 3 * 60 + 16
    pair = quantized_pair(result, scheme)
    assert pair["ppl_ratio"] <= 1 + QUANT_BOUNDS[scheme]["ppl_increase"]
    assert pair["top1_agreement"] >= QUANT_BOUNDS[scheme]["top1"]
    # Core ML's unquantized package is fp16: the fp32 baseline is twice its weight bytes.
    fp32 = weight_bytes(smol_artifacts / target) * (2 if target == "coreml" else 1)
    assert weight_bytes(folder) <= SIZE_GOAL[scheme] * fp32
