"""The user's path on the real SmolLM2, and bad input: one-line errors, nothing half-written."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.loaders import build_model
from exporter.reference import ReferenceRunner
from exporter.validate import FP16_REL_TOL, FP16_TOP1, schedule
from runtimes import open_artifact
from runtimes.generate import generate
from runtimes.manifest import load_tokenizer
from tests.conftest import RUNNABLE, edgekv, make_tiny, one_line_error


@pytest.mark.parametrize("target", RUNNABLE)
def test_smollm2_exports_and_validates(smol_artifacts, target):
    r = edgekv("validate", str(smol_artifacts / target), "--onnx", str(smol_artifacts / "onnx"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["ok"] and result["target"] == target and result["tokens"] == 4 + 3 * 60 + 16
    for pair in result["pairs"]:
        assert pair["max_abs_diff"] <= 1e-3 * result["logit_scale"] and pair["top1_agreement"] >= 0.995


def test_smollm2_coreml_validates_through_the_mil_executor(smol_artifacts):
    r = edgekv("validate", str(smol_artifacts / "coreml"), "--onnx", str(smol_artifacts / "onnx"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["ok"] and result["tokens"] == 4 + 3 * 60 + 16
    pairs = {p["a"] + "/" + p["b"]: p for p in result["pairs"]}
    assert list(pairs) == ["reference/coreml-numpy", "reference/onnxruntime", "coreml-numpy/onnxruntime"]
    fp16 = pairs["reference/coreml-numpy"]
    assert fp16["max_abs_diff"] <= FP16_REL_TOL * result["logit_scale"] and fp16["top1_agreement"] >= FP16_TOP1
    assert fp16["max_abs_diff"] > 1e-3 * result["logit_scale"]  # fp16 was really computed as fp16
    assert abs(result["perplexity"]["coreml-numpy"] / result["perplexity"]["reference"] - 1) < 0.01
    assert "Core ML prediction needs macOS" in result["not_run"][0]
    calls = schedule(result["tokens"], 64, 16)  # the plan, said before anything loads
    prefill, decode = sum(k > 1 for _, k in calls), sum(k == 1 for _, k in calls)
    assert f"the NumPy MIL executor runs the package: {prefill} prefill and {decode} decode calls, about" in r.stderr


def test_greedy_generation_identical_across_runtimes(smol_artifacts, smollm2, smollm2_text_ids):
    prompt = smollm2_text_ids[:50]  # 50 + 32 tokens wrap the 64-slot cache
    model = build_model(smollm2, 4, 60, max_chunk=16)
    ref = ReferenceRunner(model, load_tokenizer(smollm2.tokenizer_dir), chunk=16)
    want = list(generate(ref, prompt, 32))
    assert len(want) == 32 and len(set(want)) > 3  # a real continuation, not one token repeated
    for target in (*RUNNABLE, "coreml"):  # Core ML through the NumPy MIL executor, in fp16
        runner = open_artifact(smol_artifacts / target)
        assert list(generate(runner, prompt, 32)) == want, target
        runner.reset()  # a second stream from position 0 gives the same tokens
        assert list(generate(runner, prompt, 8)) == want[:8], target


def test_artifact_ppl_uses_the_runner(smol_artifacts, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question: " * 8)
    r = edgekv("ppl", str(smol_artifacts / "onnx"), "--text", str(text), "--tokens", "80", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert (out["tokens"], out["sink"], out["window"]) == (80, 4, 60) and 1.0 < out["ppl"] < 50


def test_chat_two_turns_through_stdin(smol_artifacts):
    r = edgekv(
        "chat",
        str(smol_artifacts / "onnx"),
        "--max-tokens",
        "24",
        "--seed",
        "1",
        stdin="Hello! Who are you?\nName three colours.\n",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("[") and "stream position" in ln]
    assert len(stats) == 2, r.stderr[-2000:]
    positions = [int(ln.split("stream position ")[1].split(",")[0]) for ln in stats]
    assert 0 < positions[0] < positions[1] and positions[1] > 4 + 60  # one stream, past the first wrap
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) >= 2


def test_chat_stream_holds_exactly_the_rendered_conversation(smol_artifacts):
    from runtimes.chat import Chat, ChatTemplate

    runner = open_artifact(smol_artifacts / "onnx")
    fed, feed = [], runner.feed
    runner.feed = lambda tokens: (fed.extend(tokens), feed(tokens))[1]  # record what enters the cache
    chat = Chat(runner, ChatTemplate(smol_artifacts / "onnx"))
    answers = ["".join(chat.reply(q, 20)) for q in ("What is the capital of France?", "And of Italy?")]
    assert all(a.strip() for a in answers) and runner.pos == len(fed) > 4 + 60
    assert runner.tokenizer.decode(fed, skip_special_tokens=False) == chat.in_stream
    assert chat.in_stream.startswith("<|im_start|>system\n") and chat.in_stream.count("<|im_start|>user\n") == 2


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    folder = make_tiny("llama", tmp / "hf")
    r = edgekv(
        "export",
        "--target",
        "onnx",
        "--model",
        str(folder),
        "--sink",
        "2",
        "--window",
        "6",
        "--chunk",
        "4",
        "--out",
        str(tmp / "out"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return folder, tmp / "out"


def test_unknown_target():
    one_line_error(edgekv("export", "--target", "tflite"), "invalid choice: 'tflite'")


def test_missing_model(tmp_path):
    one_line_error(
        edgekv("export", "--target", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)),
        "no such file or folder",
    )
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tiny_onnx):
    folder, out = tiny_onnx
    before = (out / "onnx" / "edgekv.json").read_text()
    one_line_error(
        edgekv("export", "--target", "onnx", "--model", str(folder), "--out", str(out)), "exists; pass --force"
    )
    assert (out / "onnx" / "edgekv.json").read_text() == before


def test_corrupt_manifest_and_model(tiny_onnx, tmp_path):
    import shutil

    _, out = tiny_onnx
    bad = tmp_path / "bad"
    shutil.copytree(out / "onnx", bad)
    manifest = (bad / "edgekv.json").read_text()
    (bad / "edgekv.json").write_text(manifest[: len(manifest) // 2])
    one_line_error(edgekv("validate", str(bad)), "edgekv.json is corrupt")
    (bad / "edgekv.json").write_text(manifest)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    one_line_error(edgekv("validate", str(bad)), "model.onnx is corrupt")
    (bad / "model.onnx").unlink()
    one_line_error(edgekv("ppl", str(bad), "--text", str(bad / "tokenizer.json")), "model.onnx (model) is missing")


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


INT, TERM, HUP = signal.SIGINT, signal.SIGTERM, signal.SIGHUP


@pytest.mark.parametrize(
    "target,line,sig",
    [
        ("all", "] loading ", INT),
        ("all", "traced decode and prefill", INT),
        ("openvino", "converted to ONNX", INT),
        ("openvino", "converted to ONNX", TERM),  # timeout, a service manager, a CI runner
        ("openvino", "converted to ONNX", HUP),  # a closed terminal
    ],
)
def test_interrupted_export_leaves_the_tree_as_it_was(tiny_onnx, tmp_path, target, line, sig):
    """Ctrl-C while loading, in the middle of the first conversion, between two converters, and SIGTERM or SIGHUP
    there: exit 128 + n, and every folder the command created is gone (OUT was two levels that did not exist), its
    temporary folder ($TMPDIR/edgekv-<pid>-*) too."""
    folder, _ = tiny_onnx
    (tmp_path / "kept").mkdir()
    (tmp_path / "tmp").mkdir()
    before = tree(tmp_path)
    argv = ["export", "--target", target, "--model", str(folder), "--out", str(tmp_path / "new" / "out")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter.cli", *argv],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
        # Ctrl-C as a terminal delivers it, even where the test itself runs with SIGINT ignored
        # (a shell's background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for got in proc.stderr:
        if line in got:
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=300)
    said = "edgekv: interrupted" if sig == INT else f"edgekv: stopped by {signal.Signals(sig).name}"
    assert proc.returncode == 128 + sig and err.strip().splitlines()[-1] == said, err[-1500:]
    assert tree(tmp_path) == before


def test_coreml_runs_on_linux_through_the_mil_executor(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("Core ML itself runs on macOS")
    folder = make_tiny("qwen2", tmp_path / "hf")
    r = edgekv(
        "export",
        "--target",
        "coreml",
        "--model",
        str(folder),
        "--sink",
        "1",
        "--window",
        "5",
        "--chunk",
        "2",
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(40)))
    r = edgekv("ppl", str(tmp_path / "out" / "coreml"), "--text", str(text), "--tokens", "30", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NumPy MIL executor" in r.stderr and "its speed is not Core ML's" in r.stderr
    eager = edgekv(
        "ppl", "--model", str(folder), "--sink", "1", "--window", "5", "--text", str(text), "--tokens", "30", "--json"
    )
    assert eager.returncode == 0, eager.stderr[-2000:]
    got, want = json.loads(r.stdout), json.loads(eager.stdout)
    assert got["tokens"] == want["tokens"] == 30 and abs(got["ppl"] / want["ppl"] - 1) < 1e-2
