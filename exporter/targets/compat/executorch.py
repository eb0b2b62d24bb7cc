"""ExecuTorch's XNNPACK lowering with the model's weights held once, as a 7B model needs, and without its slowest
redundant work. `hooks(folder)` applies them for one lowering (exporter/targets/executorch.py); the program written is
byte for byte ExecuTorch's own (tests/test_compat.py). What each fixes upstream: docs/upstream.md."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch

from exporter.targets.compat import Hook, patched

EXECUTORCH, TORCH = "executorch 1.5.1", "torch 2.13.0"
XNNPACK = "executorch.backends.xnnpack"
PARTITIONERS = "executorch.exir.backend.canonical_partitioners"
SPILL = 1 << 16  # blobs this big or bigger go to files; small ones (norms, biases) stay in memory


def make_hooks(folder: Path) -> list[Hook]:
    """The hooks, spilling XNNPACK's serialized weights into `folder`."""
    return [
        # ExecuTorch decomposes each method twice when XNNPACK asks to keep ops whole with a per-node check; where
        # every node passes it, the check is left out and one retrace of each method is saved (9 % of an int4 export).
        Hook(
            f"{XNNPACK}.partition.xnnpack_partitioner:XnnpackPartitioner.ops_to_not_decompose",
            lambda asked: functools.partialmethod(_keeping_what_it_takes, asked),
            EXECUTORCH,
            "9713395f05ceec1b",
            wraps=True,
        ),
        # XNNPACK's 17 passes each retrace their partition through fake tensors, changed or not: a third of an
        # export's time. The pass notes its input's structure (__call__) and skips the retrace if it is unchanged.
        Hook(f"{XNNPACK}._passes.xnnpack_pass:XNNPACKPass.__call__", _recording_structure, TORCH, "41604fe6ded6acc4"),
        Hook(f"{XNNPACK}._passes.xnnpack_pass:XNNPACKPass.call", _retrace_if_changed, EXECUTORCH, "689e39bb23b9834c"),
        # XNNPACK's serialized weights were held as bytes until the .pte was written, once per method: they go to
        # files as they are made (ExecuTorch's FileBackedData), a blob both methods make written once.
        Hook(
            "executorch.exir._serialize._named_data_store:NamedDataStore.add_named_data",
            lambda add: _spilling(add, folder),
            EXECUTORCH,
            "a38f90003925da0b",
            wraps=True,
        ),
        # ExecuTorch deep-copies each partition's program, weights and all, for every method at once: a copy of the
        # model per method. The copy shares the weights (XNNPACK's passes replace a constant, never change it).
        Hook(
            f"{XNNPACK}.xnnpack_preprocess:XnnpackBackend.copy_exported_program_for_preprocess",
            classmethod(_copy_sharing_weights),
            EXECUTORCH,
            "161d76674b18cbbd",
        ),
        # The partitioners held three N^2 / 2 tables of transitive users at once, two of them never read: the 7B
        # export's peak (12.79 GB; 11.24 with each table built on first use).
        Hook("torch.fx.passes.infra.partitioner:_DependencyViewer", _Dependencies, TORCH, "47bacdf03efdce20"),
        Hook(f"{PARTITIONERS}.group_partitioner:_DependencyViewer", _Dependencies, EXECUTORCH, "a6d3ee37edb6ec3a"),
        # The merge check tested each transitive user in a Python loop (8.7 % of SmolLM2's int4 export): a set's
        # isdisjoint, the same answers.
        Hook(
            f"{PARTITIONERS}.group_partitioner:GroupBasedPartitioner._can_merge_partitions",
            _can_merge,
            EXECUTORCH,
            "08428a6ba5abd129",
        ),
        # A constant used inside and outside a partition (fp32's tied table) is deep-copied for each side, once per
        # method (2 GB of a 1B fp32 export): the duplicate shares the tensor's storage.
        Hook(
            f"{PARTITIONERS}.duplicate_constant_node_pass:copy",
            _SharingTensors,
            EXECUTORCH,
            "ea25b56c9312497c",
            relies_on=f"{PARTITIONERS}.duplicate_constant_node_pass:duplicate_constant_node",
        ),
    ]


@contextlib.contextmanager
def hooks(folder: Path) -> Iterator[None]:
    """ExecuTorch's lowering with every hook applied, its spilled weights in `folder` (which must outlive the .pte's
    writing)."""
    with patched(make_hooks(folder)):
        yield


def _spilling(add, folder: Path):
    """NamedDataStore.add_named_data, a blob of SPILL bytes or more handed over as a file in `folder` instead."""
    from executorch.exir._serialize._cord import FileBackedData

    spilled: dict[str, FileBackedData] = {}

    def add_on_disk(self, key, data, *args, **kwargs):
        if isinstance(data, bytes) and len(data) >= SPILL:
            if key not in spilled:
                path = folder / f"{len(spilled)}.bin"
                path.write_bytes(data)
                spilled[key] = FileBackedData(str(path), sha256=hashlib.sha256(data).digest())
            if len(spilled[key]) == len(data):  # else the store's own check says the key's data differ
                data = spilled[key]
        return add(self, key, data, *args, **kwargs)

    return add_on_disk


def _copy_sharing_weights(cls, program, compile_specs):
    """BackendDetails.copy_exported_program_for_preprocess: its deepcopy, with the weights shared (a memo)."""
    weights = (*program.state_dict.values(), *program.constants.values())
    return copy.deepcopy(program, {id(w): w for w in weights if isinstance(w, torch.Tensor)})


def _can_merge(self, p1: int, p2: int, partitions_by_id: dict) -> bool:
    """GroupBasedPartitioner._can_merge_partitions, the same answer: merging two partitions makes a cycle if a user
    outside them reaches back into them, or if the live graph's own check says so."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    combined = set(partitions_by_id[p1].nodes) | set(partitions_by_id[p2].nodes)
    outside = {user for node in combined for user in node.users if user not in combined}
    if any(not self.dependency_viewer.downstreams_of(user).isdisjoint(combined) for user in outside):
        return False
    return validate_partition(list(combined))


def _keeping_what_it_takes(self, asked, program: torch.export.ExportedProgram):
    """XnnpackPartitioner.ops_to_not_decompose: the ops it asks ExecuTorch to keep whole (linear, torchao's
    quantize ops) and a check of each node. With a check, ExecuTorch decomposes each method, marks the nodes that
    pass, decomposes it again and unmarks them (EDGE_DO_NOT_DECOMP); without one, it keeps the ops through a single
    decomposition. Where every node of those ops passes the check, the two keep the same nodes; the check is left
    out then."""
    ops, check = asked(self, program)
    nodes = [
        n
        for gm in program.graph_module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target in ops
    ]
    if check is not None and all(check(n) for n in nodes):
        return ops, None
    return ops, check


def _structure(graph_module: torch.fx.GraphModule) -> list:
    """A graph's nodes in order: what they call, on what (nodes by name)."""

    def name(node):
        return node.name

    return [
        (n.op, n.target, n.name, torch.fx.node.map_arg(n.args, name), torch.fx.node.map_arg(n.kwargs, name))
        for n in graph_module.graph.nodes
    ]


def _recording_structure(self, graph_module: torch.fx.GraphModule):
    """XNNPACKPass.__call__ (torch's PassBase.__call__): the pass runs as before, its input's structure noted first."""
    from torch.fx.passes.infra.pass_base import PassBase

    self._structure_before = _structure(graph_module)
    return PassBase.__call__(self, graph_module)


def _retrace_if_changed(self, graph_module: torch.fx.GraphModule):
    """XNNPACKPass.call (ExportPass.call), which XNNPACK's passes call last (`super().call`) to retrace the partition
    through fake tensors whether or not they changed it. A pass whose partition has the structure it came with gets
    it back as it is."""
    from executorch.exir.pass_base import ExportPass
    from torch.fx.passes.infra.pass_base import PassResult

    unchanged = _structure(graph_module) == getattr(self, "_structure_before", None)
    if unchanged and type(self).call is not _retrace_if_changed:  # a pass's own call, ending in super().call
        return PassResult(graph_module, True)
    return ExportPass.call(self, graph_module)


class _SharingTensors:
    """The `copy` module as ExecuTorch's duplicate_constant_node pass sees it: its deepcopy of a plain tensor or
    parameter is a new one over the same storage; anything else (its input specs, torchao's tensors) is copied."""

    @staticmethod
    def deepcopy(value, memo=None):
        if type(value) is torch.nn.Parameter:
            return torch.nn.Parameter(value.detach(), requires_grad=value.requires_grad)
        if type(value) is torch.Tensor:
            return value.detach()
        return copy.deepcopy(value, memo)


class _Dependencies:
    """The partitioners' view of a graph (torch.fx's and ExecuTorch's `_DependencyViewer`, the same sets built the
    same way, so the same partitions as fast), each table built on first use. Every node's set of transitive users
    is N^2 / 2 set entries, and ExecuTorch's partitioner held three such tables at once: torch's view, which its own
    constructor makes and then replaces, and its own upstream table, which nothing reads."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        self._graph = graph_module.graph

    @functools.cached_property
    def _downstreams(self) -> dict:
        return self._closure(reversed(self._graph.nodes), lambda node: node.users)

    @functools.cached_property
    def _upstreams(self) -> dict:
        return self._closure(self._graph.nodes, lambda node: node.all_input_nodes)

    @staticmethod
    def _closure(nodes, neighbours) -> dict:
        table = collections.defaultdict(set)
        for node in nodes:
            for other in neighbours(node):
                table[node].add(other)
                table[node].update(table[other])
        return table

    def downstreams_of(self, node: torch.fx.Node) -> set:
        return self._downstreams[node]

    def upstreams_of(self, node: torch.fx.Node) -> set:
        return self._upstreams[node]
