"""Golden fixtures shared with the Swift tests of apps/ios-demo (llama2.c style).

Tiny models are exported here and their manifests written to the Swift test target's Fixtures/, beside
golden/vectors.json: for each exported geometry, the slot every position is written to, the slots it
sees and the position each slot holds (computed by exporter/cache.py's tensor code, the code the exports
trace), and how the runners split a feed into calls. `swift test` decodes every one of those manifests
and reproduces the table from the geometry it decoded. The fixtures are committed, so `swift test` works
on a fresh clone and in Xcode; these tests fail when a fresh export differs from them in anything but
the fields `stable` blanks. To rewrite them:

    EDGEKV_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_ios_golden.py
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from exporter.cache import slot_positions, visible
from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.quantize import Quantization
from runtimes import Runner
from runtimes.manifest import SCHEMA
from runtimes.slots import slot_of
from tests.conftest import make_tiny

FIXTURES = Path(__file__).resolve().parents[1] / "apps" / "ios-demo" / "Tests" / "EdgeKVCoreTests" / "Fixtures"
VECTORS = FIXTURES / "golden" / "vectors.json"
UPDATE = os.environ.get("EDGEKV_UPDATE_GOLDEN") == "1"


@dataclass(frozen=True)
class Config:
    """One tiny checkpoint and cache geometry, exported to each (target, scheme, fixture path)."""

    family: str
    sink: int
    window: int
    chunk: int
    exports: tuple[tuple[str, str, str], ...]
    overrides: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.overrides.items())
        return f"tests/conftest.py make_tiny({self.family!r}{extra})"


CONFIGS = (
    # The geometry the app's other tests use; its Core ML manifest is Fixtures/edgekv.json.
    Config(
        "llama",
        4,
        28,
        8,
        (
            ("coreml", "none", "edgekv.json"),
            ("onnx", "none", "golden/llama-s4-w28-c8-onnx.json"),
            ("openvino", "none", "golden/llama-s4-w28-c8-openvino.json"),
        ),
    ),
    # No sink (a plain ring) and no prefill chunk.
    Config("qwen2", 0, 6, 1, (("coreml", "none", "golden/qwen2-s0-w6-c1-coreml.json"),)),
    # One sink, a chunk longer than the ring, int4 weights (widths that group size 32 divides).
    Config(
        "mistral",
        1,
        5,
        8,
        (("coreml", "int4", "golden/mistral-s1-w5-c8-coreml-int4.json"),),
        {"hidden_size": 64, "intermediate_size": 128},
    ),
)


# --- the table -----------------------------------------------------------------------------------


def positions_table(sink: int, window: int) -> list[dict]:
    """Per position, through three wraps of the ring: its slot, the slots its query sees once it is written,
    and the absolute position each slot then holds (-1: empty)."""
    rows = []
    for p in range(sink + 3 * window + 2):
        last = torch.tensor([p])
        held = slot_positions(last, sink, window)
        seen = visible(last, held, sink, window)[0]
        rows.append(
            {
                "position": p,
                "slot": slot_of(p, sink, window),
                "visible": seen.nonzero().flatten().tolist(),
                "held": held.tolist(),
            }
        )
    return rows


def feed_calls(count: int, chunk: int) -> list[int]:
    """Tokens per call when a runner feeds `count` tokens (`Runner.feed`, with the model call recorded)."""
    runner = Runner.__new__(Runner)  # no artifact: only the feed plan runs
    runner.chunk, runner.pos, runner.token_dtype = chunk, 0, np.int32
    calls = []
    runner._run = lambda tokens, pos: calls.append(tokens.shape[1])
    runner.feed(list(range(count)))
    return calls


def vectors() -> dict:
    cases = []
    for c in CONFIGS:
        counts = sorted({n for n in (1, c.chunk - 1, c.chunk, c.chunk + 1, 2 * c.chunk + 3) if n > 0})
        cases.append(
            {
                "manifests": [path for _, _, path in c.exports],
                "sink": c.sink,
                "window": c.window,
                "chunk": c.chunk,
                "feed": [{"tokens": n, "calls": feed_calls(n, c.chunk)} for n in counts],
                "positions": positions_table(c.sink, c.window),
            }
        )
    return {"cases": cases}


def render(table: dict) -> str:
    """JSON with one row per line, so a change to the table reads as a short diff."""

    def rows(key: str, items: list) -> str:
        return f'      "{key}": [\n' + ",\n".join(f"        {json.dumps(r)}" for r in items) + "\n      ]"

    cases = []
    for case in table["cases"]:
        head = ",\n".join(f'      "{k}": {json.dumps(case[k])}' for k in ("manifests", "sink", "window", "chunk"))
        cases.append(
            "    {\n"
            + head
            + ",\n"
            + rows("feed", case["feed"])
            + ",\n"
            + rows("positions", case["positions"])
            + "\n    }"
        )
    return '{\n  "cases": [\n' + ",\n".join(cases) + "\n  ]\n}\n"


# --- the manifests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[str, dict]:
    """Fixture path -> the manifest a fresh export writes (source.model named by how the model was made)."""
    out = {}
    for c in CONFIGS:
        tmp = tmp_path_factory.mktemp(c.family)
        ckpt = load_checkpoint(make_tiny(c.family, tmp / "hf", **c.overrides))
        model = build_model(ckpt, c.sink, c.window, max_chunk=c.chunk, last_logits_only=True)
        base = manifest_base(ckpt, c.sink, c.window, c.chunk)
        for target, scheme, path in c.exports:
            folder = export_one(model, ckpt, target, tmp / f"{target}-{scheme}", base, c.chunk, Quantization(scheme))
            manifest = json.loads((folder / "edgekv.json").read_text())
            manifest["source"]["model"] = c.source  # the export's path is a temporary folder
            out[path] = manifest
    return out


def stable(manifest: dict) -> dict:
    """The manifest without what changes with a release or a re-export but not what the app reads: the
    edgekv version, the weights' hash and the files' digests (their names stay)."""
    m = copy.deepcopy(manifest)
    m["edgekv_version"] = "*"
    m["source"]["weights_sha256"] = "*"
    m["digests"] = dict.fromkeys(m["digests"], "*")
    return m


def differences(a, b, path: str = "") -> list[str]:
    """Paths (`inputs[0].dtype`) where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(a.keys() | b.keys())
            for d in (
                differences(a[k], b[k], f"{path}.{k}".lstrip(".")) if k in a and k in b else [f"{path}.{k}".lstrip(".")]
            )
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [path]


def fixture_manifests() -> list[str]:
    """Every manifest in Fixtures/, as the Swift tests find them."""
    return sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*.json") if p != VECTORS)


def expected_manifests() -> list[str]:
    return sorted(path for c in CONFIGS for _, _, path in c.exports)


HOW_TO_UPDATE = (
    "re-export differs from the committed Swift fixtures; if the change is meant, run "
    "`EDGEKV_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_ios_golden.py`, "
    "then `swift test` in apps/ios-demo"
)


def test_golden_vectors_are_current():
    text = render(vectors())
    if UPDATE:
        VECTORS.parent.mkdir(exist_ok=True)
        VECTORS.write_text(text)
    assert json.loads(text) == vectors()  # the rendering is the table, nothing lost
    assert VECTORS.read_text() == text, HOW_TO_UPDATE


def test_golden_manifests_are_current(fresh):
    if UPDATE:
        for stale in set(fixture_manifests()) - set(fresh):
            (FIXTURES / stale).unlink()
        for path, manifest in fresh.items():
            old = FIXTURES / path
            if not old.is_file() or differences(stable(json.loads(old.read_text())), stable(manifest)):
                old.parent.mkdir(exist_ok=True)
                old.write_text(json.dumps(manifest, indent=2) + "\n")
    assert fixture_manifests() == expected_manifests() == sorted(fresh), HOW_TO_UPDATE
    for path, manifest in fresh.items():
        committed = json.loads((FIXTURES / path).read_text())
        assert differences(stable(committed), stable(manifest)) == [], f"{path}: {HOW_TO_UPDATE}"


def test_fixtures_are_valid_manifests_of_each_geometry():
    schema = json.loads(SCHEMA.read_text())
    assert len(fixture_manifests()) == 5
    for c in CONFIGS:
        for target, scheme, path in c.exports:
            m = json.loads((FIXTURES / path).read_text())
            jsonschema.validate(m, schema)
            assert (m["target"], m["quantization"]["scheme"], m["sink"], m["window"], m["chunk"]) == (
                target,
                scheme,
                c.sink,
                c.window,
                c.chunk,
            )
            assert m["source"]["model"] == c.source


def test_table_is_the_contract():
    """The tensor code agrees with the contract's plain statement: token p goes to slot p if p < S, else
    S + (p - S) mod W, and sees the first min(p + 1, S) tokens and the W most recent, itself included."""
    for c in CONFIGS:
        for row in positions_table(c.sink, c.window):
            p, s, w = row["position"], c.sink, c.window
            assert row["slot"] == slot_of(p, s, w)  # itself checked against a ring walked in order (test_cache)
            seen = [*range(min(p + 1, s)), *range(max(s, p - w + 1), p + 1)]
            assert row["visible"] == sorted(slot_of(q, s, w) for q in seen)
            assert sorted(q for q in row["held"] if q >= 0) == seen  # the cache holds exactly what is seen
    one_sink = {r["position"]: r for r in positions_table(1, 5)}
    assert [one_sink[p]["slot"] for p in range(12)] == [0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1]
    assert one_sink[2] == {"position": 2, "slot": 2, "visible": [0, 1, 2], "held": [0, 1, 2, -1, -1, -1]}
    assert one_sink[8] == {"position": 8, "slot": 3, "visible": [0, 1, 2, 3, 4, 5], "held": [0, 6, 7, 8, 4, 5]}
    assert positions_table(0, 6)[13]["held"] == [12, 13, 8, 9, 10, 11]
    assert feed_calls(19, 8) == [8, 8, 1, 1, 1] and feed_calls(3, 1) == [1, 1, 1]


def test_differences_ignore_only_volatile_fields():
    committed = json.loads((FIXTURES / "edgekv.json").read_text())
    moved = copy.deepcopy(committed)
    moved["edgekv_version"] = "9.9.9"
    moved["source"]["weights_sha256"] = "sha256:" + "0" * 64
    moved["digests"] = {k: "sha256:" + "1" * 64 for k in moved["digests"]}
    assert differences(stable(committed), stable(moved)) == []
    moved["window"] += 1
    moved["inputs"][0]["dtype"] = "int64"
    moved["digests"]["extra.bin"] = "sha256:" + "2" * 64
    moved["new_key"] = 1
    assert differences(stable(committed), stable(moved)) == [
        "digests.extra.bin",
        "inputs[0].dtype",
        "new_key",
        "window",
    ]
    assert differences({"a": [1, 2]}, {"a": [1]}) == ["a"] and differences({"a": 1}, {"a": 1.0}) == ["a"]


SESSION = FIXTURES / "session.safetensors"


class _FixtureStream:
    """What save_session reads of a runner: the fixture manifest's model at position 37 (past the 32 slots,
    so every slot is written), its fp16 cache holding a counting pattern."""

    manifest = json.loads((FIXTURES / "edgekv.json").read_text())
    pos = 37

    def cache_state(self) -> np.ndarray:
        arch, m = self.manifest["architecture"], self.manifest
        shape = (2, arch["num_layers"], arch["num_kv_heads"], m["sink"] + m["window"], arch["head_dim"])
        return (np.arange(np.prod(shape)) % 2048 / 256 - 4).astype(np.float16).reshape(shape)


def test_golden_session_is_current(tmp_path):
    """Fixtures/session.safetensors, written by runtimes/session.py: the Swift SessionFile tests decode it."""
    from runtimes.session import read_session, save_session

    state = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
        "in_stream": "w1 Be brief. w2 w1 Hi w2 w3 Hello.",
    }
    save_session(_FixtureStream(), tmp_path / "s.safetensors", state)
    if UPDATE:
        SESSION.write_bytes((tmp_path / "s.safetensors").read_bytes())
    assert contents(SESSION) == contents(tmp_path / "s.safetensors"), HOW_TO_UPDATE  # safetensors orders keys anew
    cache, position, got = read_session(SESSION, _FixtureStream.manifest)
    assert position == 37 and got == state and np.array_equal(cache, _FixtureStream().cache_state())


def contents(path: Path) -> tuple[dict, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata(), f.get_tensor("cache").tobytes()
