"""An artifact folder is not trusted: its manifest is checked against the schema and against the model file itself.
Fuzzed manifests and damaged files end in the same run as the untouched folder or a one-line error (exit 2), never
a traceback and never a silently different output."""

import contextlib
import copy
import io
import json
import shutil

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.cli import main
from runtimes.manifest import SCHEMA_DOC, schema_problem

PROMPT = "w5 w17 w3 w99 w42 w8 w64"  # with 12 new tokens the stream wraps the 2 + 6 slot cache twice
ARGS = ["--prompt", PROMPT, "--max-tokens", "12", "--ignore-eos", "--json"]
# JSON Schema counts 4.0 as an integer; edgekv does not (a sink of 4.0 is a hand-edit, not a number of slots).
STRICT = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=(
        jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool)
        )
    ),
)


@pytest.fixture
def folders(tiny_chat_exports):
    return tiny_chat_exports


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def baseline(folder) -> dict:
    code, out, err = run("generate", str(folder), *ARGS)
    assert code == 0, err
    result = {k: json.loads(out)[k] for k in ("tokens", "text")}
    assert len(result["tokens"]) == 12
    return result


def paths(value, prefix=()):
    """Every key path and list index in a manifest."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for k, v in items:
        yield (*prefix, k)
        yield from paths(v, (*prefix, k))


def at(m, path):
    for k in path[:-1]:
        m = m[k]
    return m


ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.just([]),
    st.just({}),
    st.sampled_from([0, 1, -1, 4.0, "4", 65536]),
)


@st.composite
def mutated(draw, manifest: dict):
    """A manifest with one to three edits: a key dropped or renamed, a value of the wrong type or out of range, or
    the cache geometry edited with the same number of slots or another."""
    m = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "rename", "value", "geometry"]))
        if kind == "geometry":
            total = (
                m["sink"] + m["window"] if isinstance(m.get("sink"), int) and isinstance(m.get("window"), int) else 8
            )
            sink = draw(st.integers(0, total + 4))
            m["sink"], m["window"] = sink, draw(st.sampled_from([total - sink, total - sink + 1, 500]))
            continue
        options = list(paths(m))
        if not options:
            break
        path = draw(st.sampled_from(options))
        parent = at(m, path)
        if kind == "drop":
            parent.pop(path[-1])
        elif kind == "rename" and isinstance(parent, dict):
            parent[path[-1] + draw(st.sampled_from(["_", "s", "X"]))] = parent.pop(path[-1])
        else:
            parent[path[-1]] = draw(ODD_VALUES)
    return m


def outcome(code: int, out: str, err: str, want: dict) -> str:
    """'ran' (the same tokens as the untouched folder) or 'refused' (one line `edgekv: error:`, exit 2)."""
    if code == 0:
        got = json.loads(out)
        assert {k: got[k] for k in want} == want, "a damaged folder ran with a different output"
        return "ran"
    lines = [ln for ln in err.splitlines() if not ln.startswith("edgekv: note:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edgekv: error: "), (code, err[-1500:])
    return "refused"


SETTINGS = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.mark.parametrize("target", ["onnx", "openvino", "coreml", pytest.param("executorch", marks=pytest.mark.slow)])
def test_fuzzed_manifests_run_the_same_or_are_refused_in_one_line(folders, tmp_path, target, record_property):
    folder = tmp_path / target
    shutil.copytree(folders[target], folder)
    want = baseline(folder)
    manifest = json.loads((folder / "edgekv.json").read_text())
    seen = {"ran": 0, "refused": 0}

    @settings(SETTINGS, max_examples=200)
    @given(st.data())
    def case(data):
        edited = data.draw(mutated(manifest))
        (folder / "edgekv.json").write_text(json.dumps(edited))
        seen[outcome(*run("generate", str(folder), *ARGS), want)] += 1

    case()
    record_property(
        "measured",
        f"fuzzed {target} manifests: {sum(seen.values())} cases, {seen['ran']} ran "
        f"as the untouched folder, {seen['refused']} refused in one line",
    )
    assert seen["refused"] > 0.5 * sum(seen.values())


@pytest.mark.parametrize("target", ["onnx", "coreml", pytest.param("executorch", marks=pytest.mark.slow)])
def test_damaged_files_are_refused_in_one_line(folders, tmp_path, target, record_property):
    folder = tmp_path / target
    shutil.copytree(folders[target], folder)
    want = baseline(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    originals = {p: p.read_bytes() for p in files}
    seen = {"ran": 0, "refused": 0}

    @settings(SETTINGS, max_examples=80)
    @given(st.sampled_from(files), st.sampled_from(["truncate", "flip"]), st.floats(0, 1), st.integers(1, 255))
    def case(path, how, where, mask):
        data = bytearray(originals[path])
        i = min(int(where * len(data)), len(data) - 1)
        if how == "truncate":
            del data[i:]
        else:
            data[i] ^= mask
        path.write_bytes(bytes(data))
        try:
            seen[outcome(*run("generate", str(folder), *ARGS), want)] += 1
        finally:
            path.write_bytes(originals[path])

    case()
    record_property(
        "measured",
        f"damaged {target} files: {sum(seen.values())} cases, {seen['ran']} ran "
        f"as the untouched folder, {seen['refused']} refused in one line",
    )
    assert seen["refused"] > 0.5 * sum(seen.values())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_the_builtin_schema_check_agrees_with_jsonschema(data):
    """runtimes/manifest.py checks the schema itself (the base install has no jsonschema); both verdicts agree."""
    base = json.loads(SCHEMA_EXAMPLE)
    edited = data.draw(mutated(base))
    problem = schema_problem(edited, SCHEMA_DOC)
    errors = list(STRICT(SCHEMA_DOC).iter_errors(edited))
    assert (problem is None) == (not errors), (problem, [e.message for e in errors][:3])


SCHEMA_EXAMPLE = json.dumps(
    {
        "format_version": 4,
        "edgekv_version": "0.1.0",
        "target": "onnx",
        "source": {"model": "m", "kind": "hf", "weights_sha256": "sha256:" + "0" * 64},
        "architecture": {
            "model_type": "llama",
            "num_layers": 2,
            "hidden_size": 32,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 256,
        },
        "sink": 2,
        "window": 6,
        "chunk": 4,
        "vocab_size": 128,
        "special_tokens": {"bos": 1, "eos": 2, "pad": None, "unk": None},
        "cache_layout": "text",
        "entries": {"decode": "d", "prefill": "p"},
        "inputs": [
            {"role": "tokens", "name": "tokens", "dtype": "int64", "shape": [1, "T"]},
            {"role": "position", "name": "input_pos", "dtype": "int64", "shape": [1]},
        ],
        "outputs": [{"role": "logits", "name": "logits", "dtype": "float32", "shape": [1, 128]}],
        "state": [],
        "compute_precision": "float32",
        "quantization": {
            "scheme": "none",
            "group_size": None,
            "method": "none",
            "weights": "float32",
            "activations": "float32",
            "cache_dtype": "float32",
        },
        "files": {"model": "model.onnx", "tokenizer": "tokenizer.json"},
        "digests": {"model.onnx": "sha256:" + "1" * 64},
    }
)
