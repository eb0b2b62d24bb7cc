"""What edgekv prints while it works: its own lines get through, the converters' output is captured (and shown when
the work fails), long loops report progress also when stderr is not a terminal."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest

from runtimes import progress
from runtimes.errors import EdgekvWarning


def test_captured_keeps_only_edgekvs_lines(capfd):
    with progress.captured():
        os.write(2, b"a C++ library's line\n")
        os.write(1, b"torch.onnx's chatter on stdout\n")
        print("a tqdm bar", file=sys.stderr)
        warnings.warn("a converter's warning", UserWarning, stacklevel=1)
        warnings.warn("S + W beyond the trained context", EdgekvWarning, stacklevel=1)
        progress.Progress("onnx")("converted to ONNX")
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2, err
    assert lines[0] == "edgekv: warning: S + W beyond the trained context"
    assert lines[1].startswith("[onnx ") and lines[1].endswith("s] converted to ONNX")


def test_a_failure_shows_what_was_captured(capfd):
    with pytest.raises(RuntimeError), progress.captured():
        os.write(2, b"converter: the real reason\n")
        raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert err.splitlines() == ["edgekv: the converters' last output lines:", "converter: the real reason"]


def test_debug_lets_everything_through(capfd, monkeypatch):
    monkeypatch.setenv("EDGEKV_DEBUG", "1")
    with progress.captured():
        os.write(2, b"a C++ library's line\n")
    assert capfd.readouterr().err == "a C++ library's line\n"


def test_bars_print_lines_with_the_time_left_when_stderr_is_a_file(tmp_path):
    """A 10-step loop of 0.1 s with the first line after 0.25 s and then every 0.3 s, stderr a file."""
    script = (
        "import time\nfrom runtimes import progress\nprogress.FIRST, progress.EVERY = 0.25, 0.3\n"
        "with progress.Bar(10, 'validate') as bar:\n    for _ in range(10):\n"
        "        time.sleep(0.1)\n        bar.update(1)\n"
    )
    with open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, cwd=progress.__file__.rsplit("/", 2)[0])
    lines = (tmp_path / "err").read_text().splitlines()
    assert 2 <= len(lines) <= 4, lines
    first = lines[0]
    assert first.startswith("edgekv: validate: 3/10 tok (") and first.endswith(" s left)"), lines
    left = float(first.split("about ")[1].split(" s left")[0])
    assert 0 < left <= 1, lines  # 7 steps of 0.1 s to go


def test_a_failed_export_names_a_nearly_full_disk(tmp_path):
    from exporter.export import disk_hint

    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    hint = disk_hint(tmp_path, low=float("inf"))
    assert hint.startswith(" (only ") and abs(int(hint.split()[1]) - free_mb) < 100
    assert disk_hint(tmp_path, low=0) == ""
