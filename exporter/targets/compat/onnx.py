"""torch.onnx.export without the copies of the weights its graphs keep after it returns. `hooks()` wraps one export
and its saving (exporter/targets/onnx.py): on leaving, the data of every onnx_ir tensor made inside is dropped. The
model file is written before, and is the same (tests/test_compat.py). What it fixes upstream: docs/upstream.md."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from exporter.targets.compat import Hook, patched

# onnx_ir's Tensor holds its data in `_raw` (it has no public way to release it): nothing is replaced, the hook relies
# on that class being as it was. torch.onnx.export's graphs outlive it, held from outside Python's gc (no path to them
# from any module), and with them copies of the weights (the folded transposes, 1B fp32: 5 GB); OpenVINO's export
# held the weights twice so (1B fp32 10.19 GB, 7B int4 13.58 GB).
HOOKS = [Hook("onnx_ir:Tensor._raw", None, "onnx_ir 1.1.0", "75d4e3c50975ab63", relies_on="onnx_ir:Tensor.__init__")]


def make_hooks() -> list[Hook]:
    return list(HOOKS)


@contextlib.contextmanager
def hooks() -> Iterator[None]:
    """Drop, on leaving, the data of every onnx_ir tensor made inside (the file must be written by then)."""
    with patched(make_hooks()):
        before = graph_tensors()
        try:
            yield
        finally:
            drop_graph_data(before)


def onnx_ir_tensors():
    """Every live onnx_ir tensor. By type, not isinstance: isinstance falls back to reading `o.__class__`, which
    raises ReferenceError on a dead weak proxy among gc's objects (it failed an export at random). That is Python's
    isinstance against any class (int too), not onnx_ir's Protocol bases."""
    import onnx_ir

    return (o for o in gc.get_objects() if issubclass(type(o), onnx_ir.Tensor))


def graph_tensors() -> set[int]:
    return {id(o) for o in onnx_ir_tensors()}


def drop_graph_data(keep: set[int]) -> None:
    """Drop the data of every onnx_ir tensor but those in `keep` (by id)."""
    gc.collect()
    for o in onnx_ir_tensors():
        if id(o) not in keep:
            o._raw = None  # noqa: SLF001 (onnx_ir has no public way to release a tensor's data)
    gc.collect()
