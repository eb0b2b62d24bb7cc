"""Every way a command stops leaves nothing behind: SIGTERM and SIGHUP unwind like Ctrl-C (so every `finally` and
temporary folder cleans up), temporary files live in one folder of this process's, and what a killed process left
(SIGKILL, a power cut) is removed by the next run that finds it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)
TMP_PREFIX = "edgekv-"  # this process's temporary folder: edgekv-<pid>-<random>


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where Python was when it came; a KeyboardInterrupt so that it unwinds as Ctrl-C does
    (nothing catches it by accident: it is not an Exception)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped once; a second SIGTERM or SIGHUP while cleaning up is ignored, so cleanup
    finishes."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, frame):
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    # A signal already ignored stays ignored (`nohup edgekv export ...` must outlive its terminal).
    previous = {s: signal.signal(s, stop) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def alive(pid: int) -> bool:
    """Is a process with this id running (on this machine)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> None:
    """Remove the entries of `folder` whose name matches `pattern` (its group 1 a process id) and whose process is
    gone: what a killed edgekv left. A live process's entries are its own business."""
    regex = re.compile(pattern)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        m = regex.fullmatch(entry.name)
        if m and int(m.group(1)) != os.getpid() and not alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


@contextmanager
def private_tmp() -> Iterator[Path]:
    """Python's temporary files (the converters' too: coremltools, torch, ExecuTorch use `tempfile`) and child
    processes' ($TMPDIR) go into one folder of this process's, removed as it ends, whatever ended it."""
    base = Path(tempfile.gettempdir())
    remove_stale(base, re.escape(TMP_PREFIX) + r"(\d+)-\w+")
    own = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=base))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(own), str(own)
    try:
        yield own
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(own, ignore_errors=True)
