"""Every change edgekv makes to a third-party package, in one place: one module per backend (executorch.py,
coreml.py, onnx.py), each with one context manager, `hooks(...)`, that applies its hooks and takes them all back on
leaving (also when the body raises), so that no patch outlives an export.

A Hook replaces one attribute of a class or a module (or one entry of a registry dict) and records the package
release it was written for and a fingerprint of the upstream code it replaces or relies on: the first 16 hex digits
of the SHA-256 of that code's source (`inspect.getsource`). Before any hook is applied, every one is looked up:

- its code missing, or a different fingerprint: EdgekvError, one line naming the hook, the package, the installed
  release and the one the hook was written for. Re-read the hook against the new source (docs/upstream.md says what
  each one fixes), then update its `fingerprint` and `written_for`, or drop it if the release fixed the problem.
  EDGEKV_UNCHECKED_HOOKS=1 applies the hooks anyway (the exported program is then not known to be the same).
- the same fingerprint under another release: applied as it is. The fingerprint is the check; the version is only
  reported (a release that leaves the code alone needs nothing done).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runtimes.errors import EdgekvError

UNCHECKED = "EDGEKV_UNCHECKED_HOOKS"
_MISSING = object()


@dataclass(frozen=True)
class Hook:
    target: str  # "package.module:Owner.attribute", what the hook replaces (a registry dict's, with `key`)
    replacement: Any  # the new value; None: nothing is replaced, the hook only relies on `target` being as it was
    written_for: str  # "executorch 1.5.1": the package (its distribution name) and the release fingerprinted
    fingerprint: str  # of the source of `relies_on`, else of what `target` holds (`fingerprint_of`)
    key: str | None = None  # `target` is a dict (a registry) and this its entry
    wraps: bool = False  # `replacement` is called with the value it replaces and returns the one to set
    relies_on: str | None = None  # the upstream code the hook depends on, when it is not the replaced value

    @property
    def name(self) -> str:
        return self.target if self.key is None else f"{self.target}[{self.key!r}]"

    @property
    def package(self) -> str:
        return self.written_for.split()[0]


def resolve(path: str) -> Any:
    """The object at "package.module:Attr.attr"."""
    module, _, attributes = path.partition(":")
    found = importlib.import_module(module)
    for attribute in attributes.split("."):
        found = getattr(found, attribute)
    return found


def _owner(hook: Hook) -> tuple[Any, str]:
    """What holds the replaced value, and its name there."""
    if hook.key is not None:
        return resolve(hook.target), hook.key
    module, _, attributes = hook.target.partition(":")
    owner, _, name = attributes.rpartition(".")
    return resolve(f"{module}:{owner}") if owner else importlib.import_module(module), name


def upstream(hook: Hook) -> Any:
    """The upstream code the hook's fingerprint is taken of."""
    if hook.relies_on is not None:
        return resolve(hook.relies_on)
    owner, name = _owner(hook)
    return owner[name] if isinstance(owner, dict) else getattr(owner, name)


def fingerprint_of(code: Any) -> str:
    return hashlib.sha256(inspect.getsource(code).encode()).hexdigest()[:16]


def installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def check(hook: Hook) -> None:
    """Raise EdgekvError if the hook's upstream code is gone or changed (unless EDGEKV_UNCHECKED_HOOKS=1)."""
    try:
        found = fingerprint_of(upstream(hook))
    except (ImportError, AttributeError, KeyError, OSError, TypeError):
        found = None
    if found == hook.fingerprint or os.environ.get(UNCHECKED) == "1":
        return
    what = "is gone" if found is None else f"changed (fingerprint {found}, the hook's {hook.fingerprint})"
    raise EdgekvError(
        f"edgekv's hook {hook.name} does not fit {hook.package} {installed(hook.package)} (written for "
        f"{hook.written_for}): its upstream code {what}; re-check the hook against the new source, see "
        f"docs/upstream.md; {UNCHECKED}=1 applies it anyway"
    )


def _apply(hook: Hook) -> Callable[[], None]:
    """Set the hook's replacement; return what puts back the owner's own value (an inherited one by deleting ours)."""
    owner, name = _owner(hook)
    if isinstance(owner, dict):
        saved = owner.get(name, _MISSING)
        owner[name] = hook.replacement(owner.get(name)) if hook.wraps else hook.replacement

        def undo():
            if saved is _MISSING:
                owner.pop(name, None)
            else:
                owner[name] = saved

        return undo
    saved = vars(owner).get(name, _MISSING)  # its own, not one it inherits
    setattr(owner, name, hook.replacement(getattr(owner, name)) if hook.wraps else hook.replacement)

    def undo():
        if saved is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)

    return undo


@contextlib.contextmanager
def patched(hooks: Iterable[Hook]) -> Iterator[None]:
    """Check every hook, then apply them in order; on leaving, put everything back in reverse order."""
    hooks = list(hooks)
    for hook in hooks:
        check(hook)
    undo = []
    try:
        for hook in hooks:
            if hook.replacement is not None:
                undo.append(_apply(hook))
        yield
    finally:
        for restore in reversed(undo):
            restore()
