"""What edgekv says on stderr while it works, so nothing long is ever silent and nothing else buries it: stage lines
of long work, bars of long loops (a live bar on a terminal, otherwise one line every EVERY seconds with the rate and
the time left), and the capture of the converters' and runtimes' own output."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager

from runtimes.errors import EdgekvWarning

EVERY = 30.0  # seconds between progress lines when stderr is not a terminal
FIRST = 5.0  # the first line comes early: its "about ... left" is the expected duration, said up front


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class Progress:
    """Stage lines with elapsed seconds on stderr: long conversions should never look hung."""

    latest: Progress | None = None  # the one that spoke last, which the heartbeat speaks for

    def __init__(self, prefix: str):
        self.prefix, self.start = prefix, time.perf_counter()
        self.said, self.message = self.start, ""

    def __call__(self, message: str, remember: bool = True) -> None:
        say(f"[{self.prefix} {time.perf_counter() - self.start:6.1f}s] {message}")
        self.said = time.perf_counter()
        if remember:
            self.message, Progress.latest = message, self


HEARTBEAT = 60.0  # seconds of silence in a stage before a "still working" line
_console = None  # a stream on the real stderr while the converters' output is captured


def say(line: str) -> None:
    print(line, file=_console or sys.stderr, flush=True)


@contextmanager
def captured():
    """The converters' output (Python warnings, logging, progress bars, C++ prints on file descriptors 1 and 2)
    goes to a temporary file; edgekv's own lines still reach stderr, with a heartbeat line in long silent stages.
    The captured tail is shown when the work fails; EDGEKV_DEBUG=1 captures nothing. Nested uses are one."""
    global _console
    if _console is not None or os.environ.get("EDGEKV_DEBUG"):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    log = tempfile.TemporaryFile()
    _console = open(os.dup(saved[2]), "w", buffering=1)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(5.0):
            p = Progress.latest
            if p is not None and time.perf_counter() - p.said >= HEARTBEAT:
                p(f"still working (last step: {p.message})", remember=False)

    beat = threading.Thread(target=heartbeat, daemon=True)
    failed = False
    streams = sys.stdout, sys.stderr
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        # Python-level writes too, where sys.stdout/stderr are not the file descriptors (pytest, notebooks).
        sys.stdout = sys.stderr = open(os.dup(log.fileno()), "w", buffering=1, errors="replace")
        beat.start()
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each warning once, into the log; edgekv's own to the console
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, EdgekvWarning):
                    say(f"edgekv: warning: {message}")
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield
    except Exception:
        failed = True
        raise
    finally:
        stop.set()
        sys.stdout.close()
        sys.stdout, sys.stderr = streams
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        _console.close()
        _console = None
        Progress.latest = None
        if failed:
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-30:]
            if tail:
                print("edgekv: the converters' last output lines:\n" + "\n".join(tail), file=sys.stderr, flush=True)
        log.close()


class Bar:
    def __init__(self, total: int, desc: str, unit: str = "tok", done: int = 0):
        """`done`: work finished before this bar started (a resumed run): counted in its position, not its rate."""
        self.total, self.desc, self.unit, self.n, self.done = total, desc, unit, done, done
        self.start = self.last = time.perf_counter()
        self.bar = None
        if (_console or sys.stderr).isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, file=_console or sys.stderr, leave=False)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if now - self.last >= (EVERY if self.last > self.start else FIRST) and self.n < self.total:
            self.last = now
            rate = max(self.n - self.done, 1) / (now - self.start)
            say(
                f"edgekv: {self.desc}: {self.n}/{self.total} {self.unit} ({rate:.2f} {self.unit}/s, about "
                f"{duration((self.total - self.n) / rate)} left)"
            )

    def __enter__(self) -> Bar:
        Progress.latest = None  # a bar shows its own progress: no "still working" for a stage it follows
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
