"""SmolLM2 on tinyshakespeare: attention sinks keep perplexity near dense; a plain window does not."""

import json
import subprocess
import sys

import pytest

from exporter.ppl import eager_nll
from runtimes.cli_ppl import summarize
from tests.conftest import TEXT, make_tiny

# Measured by a literal implementation of the contract (docs/cache.md), fp32, first 2,000 tokens.
DESIGN = {"dense": 36.78, "sink": 39.73, "window": 68.42}


@pytest.fixture(scope="module")
def ppl(smollm2, smollm2_text_ids):
    ids = smollm2_text_ids
    assert len(ids) == 2000
    caches = {"dense": (0, len(ids)), "sink": (4, 252), "window": (0, 256)}
    return {m: summarize(eager_nll(smollm2, ids, s, w, chunk=128, desc=m), 256)["ppl"] for m, (s, w) in caches.items()}


@pytest.mark.slow  # the eager SmolLM2 over 2,000 tokens three times: two minutes
def test_perplexity_agrees_with_the_design_measurement(ppl):
    for mode, want in DESIGN.items():
        assert abs(ppl[mode] / want - 1) < 0.01, (mode, ppl[mode])


@pytest.mark.slow
def test_sinks_rescue_the_window(ppl):
    assert ppl["window"] >= 1.5 * ppl["sink"]
    assert ppl["sink"] <= 1.15 * ppl["dense"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True, timeout=600)


def test_ppl_cli_json_on_a_tiny_model(tmp_path):
    folder = make_tiny("qwen2", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(300)))
    r = run_cli(
        "ppl", "--model", str(folder), "--text", str(text), "--sink", "2", "--window", "30", "--tokens", "120", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["tokens"], out["mode"], out["sink"], out["window"]) == (120, "sink", 2, 30)
    assert out["ppl"] > 1.0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/nonexistent/model"], "no such file or folder"),
        (["--window", "9000"], "exceeds the model's trained context"),
        (["--mode", "dense", "--tokens", "9000"], "exceeds the trained context (8192); lower --tokens"),
    ],
)
def test_ppl_cli_errors_are_one_line(args, message):
    r = run_cli("ppl", "--text", str(TEXT), *args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("edgekv: error: ") and message in last


def test_missing_text_file_is_a_clear_error(tmp_path):
    folder = make_tiny("llama", tmp_path / "m")
    r = run_cli("ppl", "--model", str(folder), "--text", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: no such text file" in r.stderr
