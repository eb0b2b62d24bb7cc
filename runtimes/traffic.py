"""Bytes one decode step moves, read from the artifact's own graph: the floor a memory-bound decode cannot beat.

A one-token decode step reads every weight of its function once, except a table it gathers rows from (the token
embedding, rotary tables), of which it reads one row; it reads every slot of each layer's own S + W (attention
reads them all, masked or not), writes one slot per layer, and writes the logits. Weights are counted from the
graph as stored (quantized bytes and their scales; for Core ML from the MIL program's constants, for ExecuTorch
from the program's constant and delegate data), so a scheme or a converter that stores a weight twice shows up
here. Activations (a few hidden-size vectors per layer) are left out: they stay in the CPU's caches.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np

from runtimes.slots import part_slots

# Ops that read only the rows their indices name from input 0, by the format's spelling.
GATHERS = {
    "Gather",
    "GatherND",
    "GatherElements",
    "GatherBlockQuantized",
    "gather",
    "gather_nd",
    "gather_along_axis",
    "aten::embedding",
    "aten::index",
    "aten::index_select",
    "quantized_decomposed::embedding_byte",
    "quantized_decomposed::embedding_4bit",
}
# Ops a weight passes through unchanged in size on its way to a gather (dequantization, casts, reshapes).
PASS = {
    "DequantizeLinear",
    "Cast",
    "Reshape",
    "Mul",
    "Sub",
    "Convert",
    "Multiply",
    "Subtract",
    "Unsqueeze",
    "constexpr_blockwise_shift_scale",
    "constexpr_affine_dequantize",
    "constexpr_lut_to_dense",
    "cast",
    "reshape",
}
ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4}


def weight_bytes(consts: dict[str, tuple[int, int]], uses: dict[str, list[tuple[str, int, list[str]]]]) -> int:
    """Bytes a step reads of the constants `consts` (name -> (bytes, rows)), given `uses` (tensor name -> the
    (op type, input index, output names) of each op reading it). A constant whose every use ends in a gather's
    input 0 counts one row; an unused one (another function's) nothing; any other, all of it."""

    def gathered(name: str) -> bool:
        return bool(uses.get(name)) and all(
            (op in GATHERS and i == 0) or (op in PASS and all(gathered(o) for o in outs)) for op, i, outs in uses[name]
        )

    return sum((n // max(rows, 1) if gathered(name) else n) for name, (n, rows) in consts.items() if uses.get(name))


def _onnx(path: Path) -> tuple[dict, dict]:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {}
    for t in graph.initializer:
        bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else None
        size = math.prod(t.dims)
        nbytes = (size + 1) // 2 if bits else size * tensor_dtype_to_np_dtype(t.data_type).itemsize
        consts[t.name] = (nbytes, t.dims[0] if t.dims else 1)
    uses = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses[name].append((node.op_type, i, list(node.output)))
    return consts, uses


def _openvino(path: Path) -> tuple[dict, dict]:
    root = ET.parse(path).getroot()
    layers = {layer.get("id"): layer for layer in root.iter("layer")}
    consts = {}
    for lid, layer in layers.items():
        if layer.get("type") == "Const":
            data = layer.find("data")
            shape = [int(d) for d in data.get("shape", "").split(",") if d]
            consts[lid] = (int(data.get("size")), shape[0] if shape else 1)
    uses = defaultdict(list)
    for edge in root.iter("edge"):
        to = layers[edge.get("to-layer")]
        ports = [p.get("id") for p in to.find("input").iter("port")]
        uses[edge.get("from-layer")].append((to.get("type"), ports.index(edge.get("to-port")), [to.get("id")]))
    return consts, uses


def _coreml(package: Path, function: str = "decode") -> tuple[dict, dict]:
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    from runtimes.mil_executor import _tensor_type

    spec = ct.utils.load_spec(str(package))
    f = spec.mlProgram.functions[function]
    consts, uses = {}, defaultdict(list)

    def size(value_type) -> tuple[int, int]:
        dtype, shape = _tensor_type(value_type)
        builtin = types.PROTO_TO_BUILTIN_TYPE[value_type.tensorType.dataType]
        bits = 4 if types.type_mapping.builtin_to_string(builtin) in ("int4", "uint4") else 8 * dtype.itemsize
        return (math.prod(shape or ()) * bits + 7) // 8, shape[0] if shape else 1

    for op in f.block_specializations[f.opset].operations:
        outs = [o.name for o in op.outputs]
        if op.type == "const":
            consts[outs[0]] = size(op.outputs[0].type)
        for key, arg in op.inputs.items():
            for a in arg.arguments:
                name = a.name or f"{outs[0]}/{key}"  # a constexpr op's weights are values inline
                if not a.name and a.value.type.WhichOneof("type") == "tensorType":
                    consts[name] = size(a.value.type)
                uses[name].append((op.type, 0 if key in ("x", "data") else 1, outs))
    return consts, uses


def _executorch(path: Path, method: str = "decode") -> tuple[dict, dict]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    plan = next(p for p in pte.program.execution_plan if p.name == method)
    consts, uses = {}, defaultdict(list)
    # Delegate (XNNPACK) weights live in the named data both methods share; a decode step reads all of them.
    named = pte.named_data
    for key, entry in named.pte_data.items() if named else ():
        consts[key] = (len(named.buffers[entry.buffer_index]), 1)
        uses[key].append(("delegate", 0, []))
    itemsize = {4: 8, 6: 4, 5: 2, 3: 4, 1: 1, 0: 1}  # ScalarType: LONG, FLOAT, HALF, INT, CHAR, BYTE
    for i, v in enumerate(plan.values):
        t = v.val
        if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0:
            consts[str(i)] = (math.prod(t.sizes) * itemsize.get(int(t.scalar_type), 4), t.sizes[0] if t.sizes else 1)
    for instr in plan.chains[0].instructions:
        call = instr.instr_args
        if type(call).__name__ == "KernelCall":
            op = plan.operators[call.op_index].name
            for j, a in enumerate(call.args):
                uses[str(a)].append((op, j, []))
    return consts, uses


def cache_bytes(manifest: dict) -> tuple[int, int]:
    """(bytes of the cache a step reads, bytes of one slot in every layer): every slot of each layer's buffer, as
    declared; of Core ML's one stacked state, each layer's own S + W slots (the slice its attention reads)."""
    declared = [t for t in manifest["inputs"] + manifest.get("state", []) if t["role"] == "cache"]
    itemsize = ITEMSIZE[declared[0]["dtype"]]
    if len(declared) == 1:
        arch, slots = manifest["architecture"], part_slots(manifest)
        slot = arch["num_kv_heads"] * arch["head_dim"] * itemsize
        return sum(slots) * slot, len(slots) * slot
    total = sum(math.prod(t["shape"]) * itemsize for t in declared)
    return total, sum(math.prod(t["shape"]) // t["shape"][-2] for t in declared) * itemsize


def step_bytes(folder: Path, manifest: dict) -> dict:
    """Bytes one decode step reads and writes: weights (from the graph), cache, logits."""
    folder = Path(folder)
    model = folder / manifest["files"]["model"]
    reader = {"onnx": _onnx, "openvino": _openvino, "coreml": _coreml, "executorch": _executorch}[manifest["target"]]
    if manifest["target"] == "openvino":
        model = model.with_suffix(".xml")
    weights = weight_bytes(*reader(model))
    cache, slot = cache_bytes(manifest)
    logits = manifest["vocab_size"] * np.dtype(np.float32).itemsize
    return {
        "weights": weights,
        "cache_read": cache,
        "cache_write": slot,
        "logits": logits,
        "total": weights + cache + slot + logits,
    }


def step_bytes_if_readable(folder: str) -> dict | None:
    """`step_bytes`, or None where the library that reads this format's graph is not installed (a run-only install
    of onnxruntime has no `onnx`): bench then leaves the line out rather than fail after its timing."""
    from runtimes.manifest import read_manifest

    try:
        return step_bytes(Path(folder), read_manifest(Path(folder), verify=False))
    except ImportError:
        return None
