"""ONNX: one graph with a dynamic token count (1 = decode, up to `chunk` = prefill). The cache is explicit
inputs the graph only reads (`key_cache.i`, `value_cache.i`, [KV, C, D] each); the graph outputs the chunk's
new cache entries, which the runtime writes into their slots in place (slot_of(input_pos + t), the later
entry winning where a chunk longer than the ring repeats a slot): per token one slot per layer is written,
and the cache is never copied."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from exporter.model import StreamingLM
from exporter.quantize import Quantization, block_quantize, with_offsets
from exporter.targets import ExportSpec, io_entry, require
from exporter.targets.compat import onnx as compat
from exporter.targets.nbits import pack, pack_tied, translations  # noqa: F401 (pack, pack_tied: the Packer's)


class PureStep(torch.nn.Module):
    """The model in its pure form: (tokens, input_pos, 2L caches [KV, C, D]) -> (logits, kv_update), the chunk's
    cache entries [2, L, KV, T, D]. One input per layer and half: onnxruntime copies every slice it takes of a
    tensor, so a stacked cache input cost a copy of the whole cache a token (profiled: a Split of 4 ms)."""

    def __init__(self, model: StreamingLM):
        super().__init__()
        self.model = model

    def forward(self, tokens, input_pos, caches):
        logits, entries = self.model.step(tokens, input_pos, caches)
        return logits, self.model.stacked(entries)


def cache_names(model: StreamingLM) -> list[str]:
    n = model.cfg.num_layers
    return [f"{half}_cache.{i}" for half in ("key", "value") for i in range(n)]


def write_onnx(model: StreamingLM, path: Path, chunk: int, identity: str) -> None:
    require("onnxscript", "onnxscript")
    t = torch.export.Dim("T", min=1, max=chunk)
    caches = [c.clone() for c in model.caches()]
    args = (torch.zeros(1, chunk, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), caches)
    # torch.onnx.export's graphs outlive it with copies of the weights: their data is dropped once the file is written
    # (exporter/targets/compat/onnx.py).
    with compat.hooks(), torch.no_grad():
        program = torch.onnx.export(
            PureStep(model).eval(), args, dynamo=True, verbose=False,
            input_names=["tokens", "input_pos", *cache_names(model)], output_names=["logits", "kv_update"],
            dynamic_shapes={"tokens": {1: t}, "input_pos": None, "caches": [None] * len(caches)},
            custom_translation_table=translations(),
        )
        program.model.metadata_props["edgekv"] = identity  # kept through quantize_onnx; read by the runner
        # Weights past 64 MB go to a side file, written a tensor at a time (inside the protobuf, saving held two more
        # copies of them; and protobuf stops at 2 GB).
        big = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) > 64e6
        program.save(str(path), external_data=big)
        del program


def pure_io(model: StreamingLM) -> dict:
    """Manifest tensors of the pure graph (ONNX, OpenVINO): the cache goes in, the chunk's entries come out."""
    cache = list(model.kv_cache.shape)
    return {
        "inputs": [io_entry("tokens", "tokens", "int64", [1, "T"]), io_entry("position", "input_pos", "int64", [1]),
                   *(io_entry("cache", name, "float32", cache[2:]) for name in cache_names(model))],
        "outputs": [io_entry("logits", "logits", "float32", [1, model.cfg.vocab_size]),
                    io_entry("cache_update", "kv_update", "float32", cache[:3] + ["T"] + cache[4:])],
        "state": [],
    }


def quantized_gather(node, table: np.ndarray, quant: Quantization, graph) -> list:
    """Gather from a constant table [V, H] -> com.microsoft GatherBlockQuantized (onnxruntime's quantizer only
    writes the 4-bit form): uint8 data offset by 2^(bits-1), the op's default zero point, as MatMulNBits stores
    symmetric weights; 4-bit values packed two per byte, low nibble first."""
    q, scale = block_quantize(table, quant.bits, quant.group_size)
    u = (q + 2 ** (quant.bits - 1)).astype(np.uint8)
    if quant.bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    name = node.input[0]
    graph.initializer.extend([numpy_helper.from_array(u, f"{name}_q{quant.bits}"),
                              numpy_helper.from_array(scale, f"{name}_scales")])
    return [gather_block_quantized(node, f"{name}_q{quant.bits}", f"{name}_scales", quant)]


def gather_block_quantized(node, data: str, scales: str, quant: Quantization):
    return onnx.helper.make_node(
        "GatherBlockQuantized", [data, node.input[1], scales], list(node.output), name=f"{node.name}_q",
        domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=quant.group_size, bits=quant.bits)


def tied_gather(node, matmul, vocab: int, quant: Quantization) -> list:
    """The lookup reads the output projection's MatMulNBits weights ([V, H/g, g*b/8] bytes and [V*H/g]
    scales, the same values in the layout GatherBlockQuantized reads) through two Reshapes, which
    onnxruntime folds at load: a tied table is stored once."""
    shape = f"{node.name}_rows"
    reshapes = [onnx.helper.make_node("Constant", [], [shape], value=numpy_helper.from_array(
        np.array([vocab, -1], dtype=np.int64)))]
    for i, part in ((1, "data"), (2, "scales")):
        reshapes.append(onnx.helper.make_node("Reshape", [matmul.input[i], shape], [f"{node.name}_{part}"]))
    return [*reshapes, gather_block_quantized(node, f"{node.name}_data", f"{node.name}_scales", quant)]


def offset_products(graph) -> list[str]:
    """The MatMul nodes torch.onnx exported from modules named `offset` (the float offsets of affine int4,
    exporter.quantize.OffsetLinear), found by the module scopes it records on every node: the quantizers must
    leave them in float. OpenVINO's converter keeps these node names."""
    def scopes(node):
        text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        return ast.literal_eval(text)

    return [n.name for n in graph.node
            if n.op_type == "MatMul" and any(s.rpartition(".")[2] == "offset" for s in scopes(n))]


def quantize_onnx(path: Path, quant: Quantization) -> None:
    """Weights of every MatMul -> MatMulNBits (onnxruntime's quantizer; accuracy level 4: int8 activations in
    the product), the embedding lookup -> GatherBlockQuantized. In place. The float32 offsets of affine int4
    (exporter.quantize.with_offsets: the products of group sums and the `offset` tables) stay."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(path))
    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    offsets = offset_products(graph)
    tied = {}  # table -> the MatMul that reads it transposed (the tied output projection)
    for node in list(graph.node):
        source = producer.get(node.input[1]) if node.op_type == "MatMul" and node.name not in offsets else None
        # The tied projection reads the embedding through a Transpose: fold it, so the quantizer sees a weight.
        if source is not None and source.op_type == "Transpose" and source.input[0] in tables:
            w = numpy_helper.to_array(tables[source.input[0]])
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{source.input[0]}_t"))
            node.input[1] = f"{source.input[0]}_t"
            tied[source.input[0]] = node.output[0]
            if not any(source.output[0] in n.input for n in graph.node):
                graph.node.remove(source)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=offsets, algo_config=DefaultWeightOnlyQuantConfig(
        block_size=quant.group_size, is_symmetric=True, accuracy_level=4, bits=quant.bits,
        op_types_to_quantize=("MatMul",)))
    quantizer.process()
    graph = quantizer.model.model.graph
    tables = {t.name: t for t in graph.initializer}
    by_output = {n.output[0]: n for n in graph.node}
    for node in list(graph.node):
        if node.op_type == "Gather" and node.input[0] in tables and not node.input[0].endswith("offset.weight"):
            table = numpy_helper.to_array(tables[node.input[0]])
            if node.input[0] in tied and by_output[tied[node.input[0]]].op_type == "MatMulNBits":
                new = tied_gather(node, by_output[tied[node.input[0]]], table.shape[0], quant)
            else:
                new = quantized_gather(node, table, quant, graph)
            at = list(graph.node).index(node)
            graph.node.remove(node)
            for i, n in enumerate(new):
                graph.node.insert(at + i, n)
    stored_as_fp16(graph, offset_tables(graph, offsets))
    result = ONNXModel(quantizer.model.model)
    result.remove_unused_constant()  # the fp32 weights
    path.with_name(path.name + ".data").unlink(missing_ok=True)  # the float graph's side file, read in at load
    result.save_model_to_file(str(path), use_external_data_format=result.model.ByteSize() > 1.8e9)


def offset_tables(graph, offsets: list[str]) -> set[str]:
    """The initializers that hold affine int4 offsets: read by the offset products (directly or through a
    Transpose) and by the offset lookup."""
    producer = {out: n for n in graph.node for out in n.output}
    names = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0].endswith("offset.weight")}
    for node in graph.node:
        if node.name in offsets:
            source = producer.get(node.input[1])
            names.add(source.input[0] if source is not None and source.op_type == "Transpose" else node.input[1])
    return names


def stored_as_fp16(graph, names: set[str]) -> None:
    """Store these float32 initializers as float16 behind a Cast, which onnxruntime folds at load: half the
    bytes on disk, float32 at run time."""
    for t in graph.initializer:
        if t.name in names:
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), f"{t.name}_fp16")
            t.CopyFrom(half)
            graph.node.insert(0, onnx.helper.make_node("Cast", [half.name], [half.name[:-5]], to=onnx.TensorProto.FLOAT,
                                                       name=f"{half.name}_cast"))


def export(model: StreamingLM, out_dir: Path, spec: ExportSpec) -> dict:
    quant = spec.quant
    if quant.bits == 4 and not model.packed:
        model = with_offsets(model, quant.group_size)
    write_onnx(model, out_dir / "model.onnx", spec.chunk, spec.identity)
    spec.log("converted to ONNX")
    if quant.bits and not model.packed:
        quantize_onnx(out_dir / "model.onnx", quant)
        spec.log(f"quantized weights to {quant.scheme} (MatMulNBits, GatherBlockQuantized)")
    files = {"model": "model.onnx"}
    if (out_dir / "model.onnx.data").exists():
        files["external_data"] = "model.onnx.data"
    how = "written as each weight was read" if model.packed else "onnxruntime's quantizer"
    return {
        "files": files,
        "entries": {"decode": "model.onnx (T=1)", "prefill": f"model.onnx (T={spec.chunk})"},
        **pure_io(model),
        "compute_precision": "float32",
        "quantization": quant.manifest(
            f"MatMulNBits (accuracy level 4) + GatherBlockQuantized, {how}" if quant.bits else "none",
            quant.describe("stored as symmetric int4 + float16 offsets") if quant.bits else "float32",
            "int8 per block in the products" if quant.bits else "float32", "float32"),
    }
