"""Sessions: a stream saved half-way and resumed in a fresh process continues exactly as if never stopped; sessions
move between targets within their precision; bad session files are refused in one line and change nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.reference import ReferenceRunner
from exporter.validate import FP16_REL_TOL, FP32_REL_TOL
from runtimes import open_artifact
from runtimes.errors import EdgekvError
from runtimes.session import load_session, save_session
from tests.conftest import TINY_CHAT_TEMPLATE, edgekv, export_tiny_chat, make_tiny, one_line_error

ROOT = Path(__file__).resolve().parents[1]
IDS = [(i * 37 + 11) % 128 for i in range(48)]  # 48 tokens through 2 + 6 slots: the ring wraps 5 times
HALF = 21
# Feeds IDS[a:b] one token at a time after loading SESSION (if given) and saves to OUT (if given); prints the logits.
SCRIPT = """
import json, sys
import numpy as np
from runtimes import open_artifact
from runtimes.session import load_session, save_session
folder, a, b, session, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ids = json.loads(sys.argv[6])
runner = open_artifact(folder)
if session != "-":
    load_session(runner, session)
logits = [runner.feed([t]).astype(np.float64).tolist() for t in ids[a:b]]
if out != "-":
    save_session(runner, out)
print(json.dumps(logits))
"""


def stream(folder: Path, a: int, b: int, session: str = "-", out: str = "-") -> np.ndarray:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), str(a), str(b), session, out, json.dumps(IDS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return np.array(json.loads(r.stdout.splitlines()[-1]))


@pytest.mark.parametrize("target", ["onnx", "openvino", "coreml", pytest.param("executorch", marks=pytest.mark.slow)])
def test_a_stream_resumed_in_a_fresh_process_is_bitwise_the_same(tiny_chat_exports, tmp_path, target, record_property):
    folder = tiny_chat_exports[target]
    whole = stream(folder, 0, len(IDS))
    session = tmp_path / "s.safetensors"
    first = stream(folder, 0, HALF, out=str(session))
    rest = stream(folder, HALF, len(IDS), session=str(session))
    assert np.array_equal(np.concatenate([first, rest]), whole)
    record_property("measured", f"tiny {target} session: {session.stat().st_size} bytes")


@pytest.fixture(scope="module")
def hybrid_exports(tmp_path_factory):
    """Tiny Gemma 3: global layers of 2 + 6 slots, local layers of 7, each its own buffer (Core ML: 8 each)."""
    tmp = tmp_path_factory.mktemp("hybrid")

    class Lazy(dict):  # each target exported on first use
        def __missing__(self, target):
            self[target] = export_tiny_chat(tmp / target, (target,), family="gemma3")[target]
            return self[target]

    return Lazy()


# Slow like the other hybrid-cache target tests (tests/test_targets.py): the default tier is near its 15 minutes.
@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "coreml", "executorch"])
def test_a_hybrid_session_resumes_across_layer_sizes(hybrid_exports, tmp_path, target):
    """Saved from ONNX's per-layer buffers (8 and 7 slots) as the stacked cache of 8, resumed by each target."""
    onnx = open_artifact(hybrid_exports["onnx"])
    whole = np.stack([onnx.feed([t]) for t in IDS])
    onnx.reset()
    for t in IDS[:HALF]:  # a token a call, as `whole` was fed: the same arithmetic, so ONNX's resume is bitwise
        onnx.feed([t])
    session = tmp_path / "hybrid.safetensors"
    save_session(onnx, session)
    runner = open_artifact(hybrid_exports[target])
    load_session(runner, session)
    state = runner.cache_state()
    assert state.shape[3] == 8 and not state[:, [0, 2], :, 7].any()  # local layers' 8th slot: never written
    rest = np.stack([runner.feed([t]) for t in IDS[HALF:]])
    bound = {"onnx": 0.0, "executorch": FP32_REL_TOL, "coreml": FP16_REL_TOL}[target]
    assert np.abs(rest - whole[HALF:]).max() <= bound * np.abs(whole).max()
    assert (rest.argmax(-1) == whole[HALF:].argmax(-1)).all()


def test_sessions_move_between_targets_within_their_precision(tiny_chat_exports, tmp_path):
    """ONNX's fp32 session into OpenVINO (fp32 bound) and into Core ML's fp16 state (fp16 bound), and back."""
    whole = stream(tiny_chat_exports["onnx"], 0, len(IDS))
    scale = np.abs(whole).max()
    session = tmp_path / "onnx.safetensors"
    stream(tiny_chat_exports["onnx"], 0, HALF, out=str(session))
    for target, bound in (("openvino", FP32_REL_TOL), ("coreml", FP16_REL_TOL)):
        rest = stream(tiny_chat_exports[target], HALF, len(IDS), session=str(session))
        assert np.abs(rest - whole[HALF:]).max() <= bound * scale, target
    fp16 = tmp_path / "coreml.safetensors"
    stream(tiny_chat_exports["coreml"], 0, HALF, out=str(fp16))
    rest = stream(tiny_chat_exports["onnx"], HALF, len(IDS), session=str(fp16))
    assert np.abs(rest - whole[HALF:]).max() <= FP16_REL_TOL * scale


@pytest.fixture(scope="module")
def other_exports(tmp_path_factory):
    """Tiny ONNX exports of other weights, and of the same weights with another cache."""
    tmp = tmp_path_factory.mktemp("other")
    out = {}
    for name, seed, sink, window in (("weights", 12, 2, 6), ("cache", 11, 3, 5)):
        hf = make_tiny("llama", tmp / f"hf-{name}", seed=seed)
        ckpt = load_checkpoint(hf)
        model = build_model(ckpt, sink, window, max_chunk=4, last_logits_only=True)
        out[name] = export_one(model, ckpt, "onnx", tmp / name, manifest_base(ckpt, sink, window, 4), 4)
    return out


def test_bad_sessions_are_refused_and_change_nothing(tiny_chat_exports, other_exports, tmp_path):
    folder = tiny_chat_exports["onnx"]
    sessions = {}
    for name, art in (("weights", other_exports["weights"]), ("cache", other_exports["cache"]), ("good", folder)):
        runner = open_artifact(art)
        runner.feed(IDS[:HALF])
        sessions[name] = tmp_path / f"{name}.safetensors"
        save_session(runner, sessions[name])
    good = sessions["good"].read_bytes()
    for name, data in (
        ("truncated", good[: len(good) // 2]),
        ("flipped", flip(good, len(good) - 5)),
        ("header", flip(good, 20)),
        ("empty", b""),
    ):
        sessions[name] = tmp_path / f"{name}.safetensors"
        sessions[name].write_bytes(data)
    runner = open_artifact(folder)
    runner.feed(IDS[:5])
    want = open_artifact(folder)
    want.feed(IDS[:5])
    messages = {}
    for name in ("weights", "cache", "truncated", "flipped", "header", "empty"):
        with pytest.raises(EdgekvError) as e:
            load_session(runner, sessions[name])
        messages[name] = str(e.value)
        assert "\n" not in messages[name] and runner.pos == 5, name
    assert "saved from another model or cache (source.weights_sha256" in messages["weights"]
    assert "saved from another model or cache (sink 3" in messages["cache"]
    assert "corrupt" in messages["flipped"] and "session" in messages["truncated"]
    assert np.array_equal(runner.feed(IDS[5:9]), want.feed(IDS[5:9]))  # untouched by the refused loads
    load_session(runner, sessions["good"])
    assert runner.pos == HALF


def flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x41
    return bytes(b)


def test_generate_resumes_a_session(tiny_chat_exports, tmp_path):
    folder, session = tiny_chat_exports["openvino"], tmp_path / "g.safetensors"
    args = ["generate", str(folder), "--ignore-eos", "--json"]
    whole = json.loads(edgekv(*args, "--prompt", "w5 w17 w3", "--max-tokens", "12").stdout)
    first = json.loads(edgekv(*args, "--prompt", "w5 w17 w3", "--max-tokens", "6", "--session", str(session)).stdout)
    r = edgekv(*args, "--prompt", "", "--max-tokens", "6", "--session", str(session))
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr[-2000:]
    assert first["tokens"] + json.loads(r.stdout)["tokens"] == whole["tokens"]
    one_line_error(edgekv("generate", str(folder), "--prompt", "", "--max-tokens", "2"), "--prompt is empty")


def test_chat_survives_a_kill_and_resumes_mid_conversation(tiny_chat_exports, tmp_path):
    """Three turns in one process, against two turns, `kill -9`, and the third turn in a new process."""
    folder, session = tiny_chat_exports["onnx"], tmp_path / "c.safetensors"
    turns = ["w4 w5 w6", "w7 w8", "w9 w10 w11"]
    chat = ["chat", str(folder), "--max-tokens", "8", "--temperature", "0"]
    whole = edgekv(*chat, stdin="\n".join(turns) + "\n")
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", *chat, "--session", str(session)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write(turns[0] + "\n" + turns[1] + "\n")
    proc.stdin.flush()  # stdin stays open: the process waits for a third turn when it is killed
    done = 0
    for line in proc.stderr:
        done += "stream position" in line
        if done == 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = edgekv(*chat, "--session", str(session), stdin=turns[2] + "\n")
    assert resumed.returncode == 0 and "resumed" in resumed.stderr, resumed.stderr[-2000:]
    assert resumed.stdout.splitlines() == whole.stdout.splitlines()[2:]
    shutil.copy(session, tmp_path / "kept.safetensors")


def test_a_pinned_system_prompt_is_the_artifacts_start_and_stays_in_the_sink(tmp_path):
    hf = make_tiny("llama", tmp_path / "hf", seed=11)
    (hf / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    (tmp_path / "system.txt").write_text("w7 w8 w9 w10 w11 w12\n")
    r = edgekv(
        "export",
        "--target",
        "onnx",
        "--model",
        str(hf),
        "--window",
        "6",
        "--chunk",
        "4",
        "--system-prompt",
        str(tmp_path / "system.txt"),
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / "out" / "onnx"
    manifest = json.loads((folder / "edgekv.json").read_text())
    ids = [1, 7, 8, 9, 10, 11, 12, 2]  # "w1 w7 .. w12 w2 ": the template's rendering, all of it in the sink
    assert manifest["sink"] == 8 and manifest["prefix"] == {
        "file": "prefix.safetensors",
        "tokens": 8,
        "system": "w7 w8 w9 w10 w11 w12",
    }
    started = open_artifact(folder)
    state = load_session(started, folder / "prefix.safetensors")
    assert started.pos == 8 and state["messages"] == [{"role": "system", "content": "w7 w8 w9 w10 w11 w12"}]
    pinned = started.cache_state()[:, :, :, :8].copy()
    prefilled = open_artifact(folder)
    prefilled.feed(ids)
    turns = IDS[:40]  # 40 tokens through a 6-slot ring: it wraps six times
    for t in turns:
        assert np.array_equal(started.feed([t]), prefilled.feed([t]))
    assert np.array_equal(started.cache_state()[:, :, :, :8], pinned)  # the prompt never left the cache
    reference = ReferenceRunner(build_model(load_checkpoint(hf), 8, 6, max_chunk=4, last_logits_only=True), None)
    want = reference.feed_all_logits(ids + turns, 0)[8:]
    got = open_artifact(folder)
    load_session(got, folder / "prefix.safetensors")
    assert np.abs(got.feed_all_logits(turns, 8) - want).max() <= FP32_REL_TOL * np.abs(want).max()
    chat = edgekv("chat", str(folder), "--max-tokens", "6", "--temperature", "0", stdin="w4 w5\n")
    assert chat.returncode == 0 and "started from the pinned system prompt (8 tokens" in chat.stderr, chat.stderr


def test_fuzzed_session_files_load_exactly_or_are_refused(tiny_chat_exports, tmp_path, record_property):
    """Truncated files and flipped bytes anywhere (header, metadata, cache): a refusal in one line that leaves the
    runner as it was, or (a flip in padding) the very same stream."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder = tiny_chat_exports["onnx"]
    runner = open_artifact(folder)
    runner.feed(IDS[:HALF])
    good = tmp_path / "good.safetensors"
    save_session(runner, good)
    data, want = good.read_bytes(), runner.cache_state()
    seen = {"loaded": 0, "refused": 0}
    target = open_artifact(folder)

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["truncate", "flip"]), st.integers(0, len(data) - 1), st.integers(1, 255))
    def case(how, at, mask):
        damaged = data[:at] if how == "truncate" else flip_with(data, at, mask)
        (tmp_path / "bad.safetensors").write_bytes(damaged)
        target.reset()
        target.feed(IDS[:3])
        try:
            load_session(target, tmp_path / "bad.safetensors")
        except EdgekvError as e:
            assert "\n" not in str(e) and target.pos == 3
            seen["refused"] += 1
            return
        assert target.pos == HALF and np.array_equal(target.cache_state(), want)
        seen["loaded"] += 1

    case()
    record_property(
        "measured",
        f"fuzzed session files: {sum(seen.values())} cases, {seen['refused']} refused, "
        f"{seen['loaded']} loaded the same stream",
    )
    assert seen["refused"] > 100


def flip_with(data: bytes, at: int, mask: int) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)
