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


@pytest.mark.parametrize("done", [0, 100])
def test_bars_print_lines_with_the_time_left_when_stderr_is_a_file(tmp_path, done):
    """A 10-step loop of 0.1 s with the first line after 0.25 s and then every 0.3 s, stderr a file; `done` steps
    finished before the bar (a resumed run) move its position but not its rate."""
    script = (
        "import time\nfrom runtimes import progress\nprogress.FIRST, progress.EVERY = 0.25, 0.3\n"
        f"with progress.Bar({done} + 10, 'validate', done={done}) as bar:\n    for _ in range(10):\n"
        "        time.sleep(0.1)\n        bar.update(1)\n"
    )
    with open(tmp_path / "err", "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, cwd=progress.__file__.rsplit("/", 2)[0])
    lines = (tmp_path / "err").read_text().splitlines()
    assert 2 <= len(lines) <= 4, lines
    first = lines[0]
    assert first.startswith(f"edgekv: validate: {done + 3}/{done + 10} tok (") and first.endswith(" s left)"), lines
    rate = float(first.split("(")[1].split(" tok/s")[0])
    assert 5 < rate <= 10.5, lines  # 3 steps in the first 0.3 s; counting `done` in would say 333 tok/s
    left = float(first.split("about ")[1].split(" s left")[0])
    assert left == 1, lines  # 7 steps of 0.1 s to go, rounded to a second


def test_a_failed_export_names_a_nearly_full_disk(tmp_path):
    from exporter.export import disk_hint

    free_mb = shutil.disk_usage(tmp_path).free / 1e6
    hint = disk_hint(tmp_path, low=float("inf"))
    assert hint.startswith(" (only ") and abs(int(hint.split()[1]) - free_mb) < 100
    assert disk_hint(tmp_path, low=0) == ""
