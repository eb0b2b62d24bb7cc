"""The user-facing error every layer raises, and the check that names the extra a missing runtime comes with."""

from __future__ import annotations

import importlib


class EdgekvError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


class EdgekvWarning(UserWarning):
    """A warning of edgekv's own: shown on stderr also while the converters' warnings are captured."""


def require(module: str, extra: str):
    """Import `module`, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module
        raise EdgekvError(f"{missing} is not installed; pip install 'edgekv[{extra}]'") from None
