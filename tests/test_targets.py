"""Every target exports; ExecuTorch, ONNX and OpenVINO match the reference over three wraps of the
ring through both entries; the Core ML package has the contract's interface and, run by the NumPy MIL
executor with Core ML's fp16 semantics, matches the reference within the fp16 bound."""

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.reference import ReferenceRunner
from exporter.targets import TARGETS
from exporter.validate import FP16_REL_TOL, run_stream, schedule
from runtimes import open_artifact
from runtimes.coreml_runner import MILRunner
from runtimes.manifest import SCHEMA, load_tokenizer, read_manifest
from runtimes.slots import layer_geometry
from runtimes.traffic import step_bytes
from tests.conftest import make_tiny

SINK, WINDOW, CHUNK = 3, 11, 5


# Llama and Qwen2 in the default tier; the newer families (Gemma 3's hybrid cache among them) in the slow one, which
# has the time (the default tier's budget is 15 minutes).
@pytest.fixture(
    scope="module",
    params=[
        "llama",
        "qwen2",
        *(pytest.param(k, marks=pytest.mark.slow) for k in ("gemma3", "mistral", "qwen3", "phi3-partial", "smollm3")),
    ],
)
def exported(request, tmp_path_factory):
    """The tiny model of one family exported to all four targets, plus its reference logits."""
    tmp = tmp_path_factory.mktemp(request.param)
    ckpt = load_checkpoint(make_tiny(request.param, tmp / "hf", seed=7))
    model = build_model(ckpt, SINK, WINDOW, max_chunk=CHUNK, last_logits_only=True)
    base = manifest_base(ckpt, SINK, WINDOW, CHUNK)
    folders = {t: export_one(model, ckpt, t, tmp / t, base, CHUNK) for t in TARGETS}
    n = SINK + 3 * WINDOW + 2 * CHUNK  # three wraps and more (Gemma's 7-slot local ring: six laps)
    ids = torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(5)).tolist()
    calls = schedule(n, SINK + WINDOW, CHUNK)
    ref = run_stream(ReferenceRunner(model, load_tokenizer(ckpt.tokenizer_dir)), ids, calls, "reference")
    return folders, ids, calls, ref


def test_schedule_uses_both_entries_across_wraps():
    calls = schedule(SINK + 3 * WINDOW + 2 * CHUNK, SINK + WINDOW, CHUNK)
    prefill = [c for c in calls if c[1] == CHUNK]
    assert prefill[-1][0] + CHUNK > SINK + WINDOW  # a chunk straddles the first wrap
    assert sum(n for _, n in calls) == SINK + 3 * WINDOW + 2 * CHUNK
    assert calls[-1][0] - (SINK + WINDOW) >= 2 * WINDOW  # decode covers two more wraps


@pytest.mark.parametrize("target", ["executorch", "onnx", "openvino"])
def test_runnable_targets_match_reference(exported, target):
    folders, ids, calls, ref = exported
    got = run_stream(open_artifact(folders[target]), ids, calls, target)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-4 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_coreml_package_matches_reference_in_fp16(exported):
    folders, ids, calls, ref = exported
    got = run_stream(MILRunner(folders["coreml"], read_manifest(folders["coreml"])), ids, calls, "coreml-numpy")
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert 1e-5 < rel <= FP16_REL_TOL  # fp16 really differs from fp32, and stays within the stated bound
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_a_decode_step_reads_every_weight_once_and_one_embedding_row(exported):
    """`step_bytes` from each graph: the checkpoint's parameters less the embedding's other rows, in the target's
    weight dtype (plus the whole table where the output projection is tied to it), give or take the graph's own
    small constants (shapes, rotary rows: under 4 KB here); the whole cache read, one slot written."""
    from safetensors.numpy import load_file

    folders = exported[0]
    tensors = load_file(str(folders["onnx"].parent / "hf" / "model.safetensors"))
    embedding = tensors["model.embed_tokens.weight"]
    params = sum(t.size for t in tensors.values()) - embedding.size + embedding.shape[1]
    if "lm_head.weight" not in tensors:  # tied (Gemma 3, SmolLM3): the output projection reads the whole table
        params += embedding.size
    for target, width in (("onnx", 4), ("openvino", 4), ("executorch", 4), ("coreml", 2)):
        m = read_manifest(folders[target])
        b = step_bytes(folders[target], m)
        # ExecuTorch stores equal constants once (these models' norm weights are all ones): at most the norms less.
        less = width * sum(t.size for t in tensors.values() if t.ndim == 1) if target == "executorch" else 1024
        # Core ML gives every linear a zero fp16 bias: two bytes an output feature more.
        more = 4096 + (2 * sum(t.shape[0] for t in tensors.values() if t.ndim == 2) if target == "coreml" else 0)
        assert -less < b["weights"] - width * params < more, (target, b["weights"], width * params)
        # Each layer reads its own S + W slots (Gemma's local layers 7 of the 14), Core ML's one state included.
        arch, own = m["architecture"], [s + w for s, w in layer_geometry(m)]
        slot = width * arch["num_kv_heads"] * arch["head_dim"]
        assert (b["cache_read"], b["cache_write"]) == (2 * sum(own) * slot, 2 * len(own) * slot), target
        if target != "coreml":  # and its graph takes just those, a buffer each
            shapes = [t["shape"] for t in m["inputs"] + m.get("state", []) if t["role"] == "cache"]
            assert [s[1] for s in shapes] == own + own, target


def test_coreml_export_reads_weights_in_fp16_and_computes_the_same(exported):
    """`edgekv export` reads an unquantized Core ML export's weights in fp16 (coreml.FLOAT_DTYPE; no fp32 copy): its
    package computes what the one converted from fp32 weights does. Bit for bit where the weights are all there
    is; Gemma's embedding scale is rounded to fp16 before it multiplies (measured 4.5e-3 of the logit scale)."""
    folders, ids, calls, _ = exported
    ckpt = load_checkpoint(folders["coreml"].parent / "hf")
    if ckpt.config.model_type not in ("llama", "qwen2", "gemma3_text"):
        pytest.skip("the same layers as Llama's, read the same way; Gemma 3's embedding scale is the one difference")
    model = build_model(ckpt, SINK, WINDOW, max_chunk=CHUNK, last_logits_only=True, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    folder = export_one(
        model, ckpt, "coreml", folders["coreml"].parent / "coreml-fp16", manifest_base(ckpt, SINK, WINDOW, CHUNK), CHUNK
    )
    want, got = (
        run_stream(MILRunner(f, read_manifest(f)), ids, calls, "coreml-numpy") for f in (folders["coreml"], folder)
    )
    bound = 1e-2 if ckpt.config.model_type.startswith("gemma") else 0.0
    assert np.abs(got - want).max() <= bound * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_coreml_package_interface(exported):
    import coremltools as ct

    folders = exported[0]
    manifest = read_manifest(folders["coreml"])
    spec = ct.utils.load_spec(str(folders["coreml"] / "model.mlpackage"))
    assert spec.specificationVersion >= 9  # iOS 18 / macOS 15: stateful models
    functions = {f.name: f for f in spec.description.functions}
    assert set(functions) == {"decode", "prefill"} and spec.description.defaultFunctionName == "decode"
    fp16 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for name, tokens in (("decode", 1), ("prefill", CHUNK)):
        f = functions[name]
        assert [i.name for i in f.input] == ["tokens", "input_pos"]
        assert list(f.input[0].type.multiArrayType.shape) == [1, tokens]
        assert [o.name for o in f.output] == ["logits"]
        assert [(s.name, s.type.stateType.arrayType.dataType) for s in f.state] == [("kv_cache", fp16)]
        assert list(f.state[0].type.stateType.arrayType.shape) == manifest["state"][0]["shape"]
    arch = manifest["architecture"]
    assert manifest["state"][0]["shape"] == [
        2,
        arch["num_layers"],
        arch["num_kv_heads"],
        SINK + WINDOW,
        arch["head_dim"],
    ]


def test_manifest_is_self_describing(exported):
    folders = exported[0]
    schema = json.loads(SCHEMA.read_text())
    for target, folder in folders.items():
        m = json.loads((Path(folder) / "edgekv.json").read_text())
        jsonschema.validate(m, schema)
        assert {t["role"] for t in m["inputs"]} >= {"tokens", "position"}
        assert (m["target"], m["sink"], m["window"], m["chunk"], m["vocab_size"]) == (target, SINK, WINDOW, CHUNK, 128)
        assert m["source"]["weights_sha256"].startswith("sha256:")
        assert (Path(folder) / "tokenizer.json").is_file()
        assert {i["name"] for i in m["inputs"]} >= {"tokens", "input_pos"}
        hybrid = m["architecture"]["model_type"] == "gemma3_text"
        assert m.get("local") == ({"window": 7, "layers": [0, 2]} if hybrid else None)


def test_ios_fixture_has_the_shape_of_a_fresh_core_ml_manifest(exported):
    """The Swift tests decode apps/ios-demo's fixture; it must stay what the exporter writes today."""
    fresh = json.loads((Path(exported[0]["coreml"]) / "edgekv.json").read_text())
    fresh.pop("local", None)  # a hybrid model's key; the Swift tests decode it from their own manifest
    fixture = json.loads(
        (
            Path(__file__).resolve().parents[1]
            / "apps"
            / "ios-demo"
            / "Tests"
            / "EdgeKVCoreTests"
            / "Fixtures"
            / "edgekv.json"
        ).read_text()
    )

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [shape(v) for v in value]
        return type(value).__name__

    assert shape(fixture) == shape(fresh)
    for key in ("entries", "compute_precision", "minimum_deployment_target", "format_version", "target"):
        assert fixture[key] == fresh[key]
    for key in ("inputs", "outputs", "state"):
        assert [(t["role"], t["name"], t["dtype"]) for t in fixture[key]] == [
            (t["role"], t["name"], t["dtype"]) for t in fresh[key]
        ]
