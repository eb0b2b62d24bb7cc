"""exporter/targets/compat: every hook into a third-party package. Each one's upstream code is the one it was written
against (its fingerprint), a changed one stops the export with one line, every patched attribute is the original
again once its context manager exits, and an export with the hooks is the export without them: the ExecuTorch .pte
and the ONNX file byte for byte, the Core ML package's spec and weights (canonical: its blob order varies from run to
run), bar the fp16 promotion, which changes the program and not a number it computes."""

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.export import export_one, manifest_base
from exporter.loaders import build_model, load_checkpoint
from exporter.quantize import NONE, Quantization
from exporter.targets import Packer, compat
from runtimes.errors import EdgekvError
from tests.conftest import make_tiny

pytest.importorskip("executorch")
pytest.importorskip("coremltools")
pytest.importorskip("onnx_ir")

from exporter.targets.compat import coreml as compat_coreml  # noqa: E402
from exporter.targets.compat import executorch as compat_executorch  # noqa: E402
from exporter.targets.compat import onnx as compat_onnx  # noqa: E402

SINK, WINDOW, CHUNK = 2, 6, 4


def all_hooks(folder: Path = Path(".")) -> list[compat.Hook]:
    return [
        *compat_executorch.make_hooks(folder),
        *compat_coreml.make_hooks(True, lambda array: None),
        *compat_onnx.make_hooks(),
    ]


def no_hooks(*args):
    return contextlib.nullcontext()


def hook(name: str) -> compat.Hook:
    return next(h for h in all_hooks() if h.name.endswith(name))


def counting(fn, name: str, taken: collections.Counter):
    @functools.wraps(fn)
    def counted(*args, **kwargs):
        taken[name] += 1
        return fn(*args, **kwargs)

    return counted


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One layer, a tied table (ExecuTorch duplicates it for the lookup outside XNNPACK), and MLP weights of 64 KB
    (the size ExecuTorch's serialized weights spill to files from)."""
    folder = tmp_path_factory.mktemp("compat") / "hf"
    return load_checkpoint(
        make_tiny("llama", folder, hidden_size=64, intermediate_size=256, num_hidden_layers=1, tie_word_embeddings=True)
    )


def export(ckpt, target: str, out: Path, quant: Quantization = NONE) -> Path:
    model = build_model(
        ckpt, SINK, WINDOW, max_chunk=CHUNK, last_logits_only=True, pack=Packer(target, quant) if quant.bits else None
    )
    return export_one(model, ckpt, target, out, manifest_base(ckpt, SINK, WINDOW, CHUNK), CHUNK, quant)


def test_every_hook_fits_the_installed_packages():
    """Each hook's fingerprint is that of the upstream code installed (the pinned releases): the first 16 hex digits
    of the SHA-256 of its source."""
    import inspect

    found = {
        h.name: hashlib.sha256(inspect.getsource(compat.upstream(h)).encode()).hexdigest()[:16] for h in all_hooks()
    }
    assert {h.name: h.fingerprint for h in all_hooks()} == found
    assert len(found) == 19


def test_a_changed_upstream_stops_the_export_in_one_line(monkeypatch):
    call = hook("XNNPACKPass.call")
    tampered = dataclasses.replace(call, fingerprint="0" * 16)
    with pytest.raises(EdgekvError) as e:
        with compat.patched([hook("_can_merge_partitions"), tampered]):
            pass
    message = str(e.value)
    assert "\n" not in message and message.count("edgekv's hook") == 1 and call.name in message
    assert "executorch 1.5.1 (written for executorch 1.5.1)" in message and "docs/upstream.md" in message
    assert "EDGEKV_UNCHECKED_HOOKS=1" in message
    from executorch.backends.xnnpack._passes.xnnpack_pass import XNNPACKPass

    assert "call" not in vars(XNNPACKPass)  # nothing applied: the checks come first
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    assert GroupBasedPartitioner._can_merge_partitions is not compat_executorch._can_merge

    gone = dataclasses.replace(call, target=call.target + "_renamed")
    with pytest.raises(EdgekvError, match="is gone"):
        compat.check(gone)
    monkeypatch.setenv("EDGEKV_UNCHECKED_HOOKS", "1")
    with compat.patched([tampered]):
        assert XNNPACKPass.call is compat_executorch._retrace_if_changed
    assert "call" not in vars(XNNPACKPass)


def snapshot(hooks: list[compat.Hook]) -> dict:
    """What each hook's owner holds as its own under the replaced name (None: nothing of its own)."""
    held = {}
    for h in hooks:
        if h.replacement is not None:
            owner, name = compat._owner(h)
            held[h.name] = owner.get(name) if isinstance(owner, dict) else vars(owner).get(name)
    return held


@pytest.mark.parametrize("raises", [False, True])
def test_every_patch_is_undone(raises):
    """Inside, every attribute is the hook's; after, the very object it was (an inherited method by its owner
    holding none again), also when the body raises."""
    hooks = all_hooks()
    before = snapshot(hooks)
    assert sum(v is None for v in before.values()) == 4  # XNNPACK's partitioner, pass, backend: inherited
    with contextlib.suppress(RuntimeError), compat.patched(hooks):
        inside = snapshot(hooks)
        assert all(inside[name] is not before[name] for name in before)
        if raises:
            raise RuntimeError("the export failed")
    after = snapshot(hooks)
    assert all(after[name] is before[name] for name in before)


class Counted:
    """Counts the uses of compat.executorch's replacements (monkeypatched over its module globals, which its
    make_hooks reads)."""

    def __init__(self, monkeypatch):
        self.taken = collections.Counter()
        m = compat_executorch
        for name in ("_can_merge", "_copy_sharing_weights", "_recording_structure"):
            monkeypatch.setattr(m, name, counting(getattr(m, name), name, self.taken))
        retrace, keep, spilling = m._retrace_if_changed, m._keeping_what_it_takes, m._spilling
        sharing = m._SharingTensors
        taken = self.taken

        def counted_retrace(self, graph_module):
            result = retrace(self, graph_module)
            taken["retrace skipped" if result.graph_module is graph_module else "retrace run"] += 1
            return result

        def counted_keep(self, asked, program):
            ops, check = keep(self, asked, program)
            taken["unchecked" if check is None else "checked"] += any(
                n.target in ops for n in program.graph.nodes if n.op == "call_function"
            )
            return ops, check

        def counted_spilling(add, folder):
            inner = spilling(add, folder)

            def add_on_disk(self, key, data, *args, **kwargs):
                taken["spilled"] += isinstance(data, bytes) and len(data) >= m.SPILL
                return inner(self, key, data, *args, **kwargs)

            return add_on_disk

        class Dependencies(m._Dependencies):
            def __init__(self, graph_module):
                taken["_Dependencies"] += 1
                super().__init__(graph_module)

        class SharingTensors(sharing):
            @staticmethod
            def deepcopy(value, memo=None):
                taken["shared"] += type(value) in (torch.Tensor, torch.nn.Parameter)
                return sharing.deepcopy(value, memo)

        for name, value in (
            ("_retrace_if_changed", counted_retrace),
            ("_keeping_what_it_takes", counted_keep),
            ("_spilling", counted_spilling),
            ("_Dependencies", Dependencies),
            ("_SharingTensors", SharingTensors),
        ):
            monkeypatch.setattr(m, name, value)


@pytest.mark.parametrize(
    "scheme", ["none", pytest.param("int8", marks=pytest.mark.slow), pytest.param("int4", marks=pytest.mark.slow)]
)
def test_executorch_hooks_and_shortcuts_do_not_change_a_byte(ckpt, tmp_path, monkeypatch, scheme):
    """ExecuTorch's .pte with every hook is byte for byte the one it writes without any, and every hook was used:
    most retraces of XNNPACK's passes skipped, the ops it keeps whole kept through one decomposition in both
    methods, the big weights spilled to files, the tied table's duplicate sharing it (fp32). int8 and int4 (four
    more exports of a two-layer model) in the slow tier."""
    if scheme != "none":
        ckpt = load_checkpoint(make_tiny("llama", tmp_path / "hf", hidden_size=64, intermediate_size=256))
    counted = Counted(monkeypatch)
    hooked = (export(ckpt, "executorch", tmp_path / "hooked", Quantization(scheme)) / "model.pte").read_bytes()
    monkeypatch.setattr(compat_executorch, "hooks", no_hooks)
    own = (export(ckpt, "executorch", tmp_path / "own", Quantization(scheme)) / "model.pte").read_bytes()
    assert hooked == own
    taken = counted.taken
    assert taken["retrace skipped"] > 2 * taken["retrace run"] > 0, taken
    assert taken["unchecked"] >= 2 and taken["checked"] == 0, taken  # decode and prefill, at least once each
    assert taken["_Dependencies"] and taken["_can_merge"], taken
    assert taken["_copy_sharing_weights"] and taken["_recording_structure"], taken
    if scheme == "none":  # the 64 KB weights spilled, the tied table's duplicate shared once a method
        assert taken["spilled"] and taken["shared"] >= 2, taken


def canonical(package: Path) -> str:
    """The package's spec as text, each weight blob named by its digest in place of its offset (coremltools and
    exporter/targets/mlpackage.py order the blobs differently from run to run)."""
    import coremltools as ct

    from exporter.targets.mlpackage import _blob_values, _digest, _record, spec_path

    spec = ct.proto.Model_pb2.Model()
    spec.ParseFromString(spec_path(package).read_bytes())
    with open(spec_path(package).parent / "weights" / "weight.bin", "rb") as fh:
        for _, blob in _blob_values(spec):
            blob.offset = int.from_bytes(_digest(fh, *_record(fh, blob.offset))[:7], "little")
    return str(spec)


def test_coreml_hooks_keep_the_package(ckpt, tmp_path, monkeypatch):
    """int4 as read (torchao's codes): every hook but the fp16 promotion leaves the package as coremltools writes it
    (its spec and weights); the promotion changes the program (fp16 ops where coremltools promoted to fp32 and the
    fp16 pass cast back) and not a number the NumPy MIL executor computes from it."""
    from exporter.targets import coreml
    from exporter.validate import run_stream, schedule
    from runtimes.coreml_runner import MILRunner
    from runtimes.manifest import read_manifest

    quant, taken = Quantization("int4"), collections.Counter()
    drop, make = coreml._drop_pages, compat_coreml.make_hooks

    def counted_drop(array):
        taken["released"] += 1
        drop(array)

    monkeypatch.setattr(coreml, "_drop_pages", counted_drop)
    for name in ("_fp16_overflow", "_dequantize_affine"):
        monkeypatch.setattr(compat_coreml, name, counting(getattr(compat_coreml, name), name, taken))
    hooked = export(ckpt, "coreml", tmp_path / "hooked", quant)
    assert taken["released"] and taken["_fp16_overflow"] and taken["_dequantize_affine"], taken
    monkeypatch.setattr(compat_coreml, "make_hooks", lambda *a: [h for h in make(*a) if "promote" in h.name])
    promoting = export(ckpt, "coreml", tmp_path / "promoting", quant)
    assert canonical(hooked / "model.mlpackage") == canonical(promoting / "model.mlpackage")
    monkeypatch.setattr(compat_coreml, "hooks", no_hooks)
    own = export(ckpt, "coreml", tmp_path / "own", quant)
    assert canonical(own / "model.mlpackage") != canonical(hooked / "model.mlpackage")
    ids = list(range(3, 20))
    calls = schedule(len(ids), SINK + WINDOW, CHUNK)
    got, want = (run_stream(MILRunner(f, read_manifest(f)), ids, calls, "coreml-numpy") for f in (hooked, own))
    assert np.array_equal(got, want)


def test_onnx_hook_keeps_the_file_and_drops_the_graphs_copies(ckpt, tmp_path, monkeypatch):
    """The ONNX file is byte for byte the one written without the hook; torch.onnx.export's graph tensors outlive an
    export without it, data and all, and have none left after one with it."""

    def made_by(run):
        before = compat_onnx.graph_tensors()
        data = (run() / "model.onnx").read_bytes()
        return data, [o for o in compat_onnx.onnx_ir_tensors() if id(o) not in before]

    hooked, kept = made_by(lambda: export(ckpt, "onnx", tmp_path / "hooked"))
    assert all(o._raw is None for o in kept)
    monkeypatch.setattr(compat_onnx, "hooks", no_hooks)
    own, left = made_by(lambda: export(ckpt, "onnx", tmp_path / "own"))
    assert hooked == own
    assert any(o._raw is not None for o in left)  # what the hook is for


def test_onnx_finds_its_tensors_beside_a_dead_weak_proxy():
    """The ONNX export lists every live onnx_ir tensor among gc's objects; a weak proxy whose object is gone is one of
    them at times, and isinstance raised on it (an export failed at random in CI), against onnx_ir's Tensor as
    against any class: Python's isinstance reads the proxy's `__class__`."""
    import onnx_ir

    class Gone:
        pass

    obj = Gone()
    proxies = [weakref.proxy(obj)]
    del obj
    tensor = onnx_ir.tensor(np.zeros(3, dtype=np.float32))
    for cls in (onnx_ir.Tensor, int):
        with pytest.raises(ReferenceError):
            isinstance(proxies[0], cls)  # what the export did, and any isinstance
    assert id(tensor) in compat_onnx.graph_tensors()


def test_fp16_range_check_agrees_with_coremltools_rule():
    """compat.coreml.overflows_fp16 (a block at a time) decides as coremltools 9.0's fp16_overflow does
    (passes/defs/quantization.py: the largest |v| below 1e38 must not pass 65504), on edge values and on arrays
    whose one outlier lies in a later block."""

    def coremltools_rule(value):
        a = np.abs(np.expand_dims(np.asarray(value, dtype=np.float32), 0))
        return bool(np.max(a[np.where(a < 1e38)], initial=0.0) > 65504)

    rng = np.random.default_rng(0)
    cases = [
        np.float32(3.0),
        [65504.0],
        [65505.0],
        [-7e4],
        [1e38],
        [3e38],
        [np.inf, -np.inf],
        [np.nan, 1.0],
        [-1e9, np.nan],
        rng.normal(size=(5, 7)).astype(np.float32),
    ]
    for where, value in ((3, 7e4), (29, -1e5), (29, np.inf), (0, 1e39)):
        a = rng.normal(size=30).astype(np.float32)
        a[where] = value
        cases.append(a.reshape(5, 6))
    decided = [(compat_coreml.overflows_fp16(c, block=8), coremltools_rule(c)) for c in cases]
    assert [ours for ours, _ in decided] == [theirs for _, theirs in decided]
    assert sum(ours for ours, _ in decided) == 5  # 65505, -7e4, -1e9, and the 7e4 and -1e5 outliers


def test_executorch_partitioners_see_the_same_dependencies(tmp_path):
    """The partitioners' dependency views swapped for one built on first use (the 7B export's peak held three N^2
    tables) and their merge check for one that asks it with a set operation: on a branching graph, the same sets as
    torch.fx's and ExecuTorch's own views, the same answers as its own check, and the originals back after."""
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner as fx_partitioner
    from torch.fx.passes.infra.partitioner import Partition

    class Branches(torch.nn.Module):
        def forward(self, x, y):
            a = torch.relu(x) + y
            b = torch.sigmoid(a) * x
            return a - b, torch.tanh(y) @ b

    graph = torch.fx.symbolic_trace(Branches())
    partitioner = group_partitioner.GroupBasedPartitioner
    originals = fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer, partitioner._can_merge_partitions
    torch_view, executorch_view = (viewer(graph) for viewer in originals[:2])
    with compat_executorch.hooks(tmp_path):
        views = fx_partitioner._DependencyViewer, group_partitioner._DependencyViewer
        assert views == (compat_executorch._Dependencies,) * 2
        assert partitioner._can_merge_partitions is compat_executorch._can_merge
        view = fx_partitioner._DependencyViewer(graph)
    assert (
        fx_partitioner._DependencyViewer,
        group_partitioner._DependencyViewer,
        partitioner._can_merge_partitions,
    ) == originals
    nodes = list(graph.graph.nodes)
    assert {n.name for n in view.downstreams_of(nodes[0])} == {
        "relu",
        "add",
        "sigmoid",
        "mul",
        "sub",
        "matmul",
        "output",
    }  # all of x's, not tanh(y)
    for node in nodes:
        assert view.downstreams_of(node) == torch_view.downstreams_of(node) == executorch_view.downstreams_of(node)
        assert view.upstreams_of(node) == executorch_view.upstreams_of(node)

    # The merge check answers as ExecuTorch's own for every pair of one- and two-node partitions.
    parts = [[n] for n in nodes] + [[a, b] for a, b in zip(nodes, nodes[2:], strict=False)]
    by_id = {i: Partition(id=i, nodes=p) for i, p in enumerate(parts)}
    judge = partitioner.__new__(partitioner)  # only its dependency_viewer is read
    answers = {}
    for name, viewer, check in (("own", executorch_view, originals[2]), ("edgekv", view, compat_executorch._can_merge)):
        judge.dependency_viewer = viewer
        answers[name] = [check(judge, i, j, by_id) for i in by_id for j in by_id if i != j]
    assert answers["own"] == answers["edgekv"]
    assert 0 < sum(answers["own"]) < len(answers["own"])  # both answers occur


def test_executorch_duplicates_a_tied_table_by_sharing_it(tmp_path, monkeypatch):
    """fp32's tied table is used outside XNNPACK (the lookup) and inside (the output projection), so ExecuTorch
    duplicates it for each side, once per method (2 GB of the 1B export's peak): with the hooks the duplicate
    shares the table's storage, and the program is byte for byte the one ExecuTorch writes itself."""
    from executorch import exir
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.backend import utils as backend_utils
    from executorch.exir.backend.canonical_partitioners import duplicate_constant_node_pass

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 16)
            self.head = torch.nn.Linear(16, 64, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(torch.relu(self.embed(tokens)))

    torch.manual_seed(0)
    model = Tied().eval()
    programs = {name: torch.export.export(model, (torch.arange(n)[None],)) for name, n in (("a", 3), ("b", 1))}
    duplicates = []  # per call: (the duplicate's data pointer, the original's)
    duplicate = backend_utils.duplicate_constant_node

    def watched(program, name):
        copies = duplicate(program, name)
        target = next(s.target for s in program.graph_signature.input_specs if s.arg.name == name)
        duplicates.extend((program.state_dict[c].data_ptr(), program.state_dict[target].data_ptr()) for c in copies)
        return copies

    monkeypatch.setattr(backend_utils, "duplicate_constant_node", watched)

    def lowered() -> bytes:
        edge = exir.to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer

    own = lowered()
    assert len(duplicates) == 2 and all(copy_ != original for copy_, original in duplicates)  # one a method
    duplicates.clear()
    with compat_executorch.hooks(tmp_path):
        shared = lowered()
    assert len(duplicates) == 2 and all(copy_ == original for copy_, original in duplicates)
    assert duplicate_constant_node_pass.copy is copy
    assert shared == own
