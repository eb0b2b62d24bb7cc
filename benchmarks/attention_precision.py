"""What a cheaper KV cache would buy on this CPU: one layer's decode attention against the cache, with the cache
in float32 and in float16 (onnxruntime and ExecuTorch/XNNPACK) and in int8 (onnxruntime), at SmolLM2's shapes.

    python benchmarks/attention_precision.py [--slots 1024] [--calls 400] [--rounds 3]

The graph is the cache part of exporter.model.Attention for one token: scores = keys @ queries (the query in
its three rope frames, G*3 = 9 columns), softmax over the slots, then probabilities @ values. A float16 cache
halves the bytes read; the products take float16 operands and return float32. The int8 cache (a quarter of the
bytes) has one scale per slot, keys stored transposed, and runs as integer products (MatMulInteger) with the
query and the scaled probabilities quantized to uint8 per call. Prints the median microseconds per call of each
variant, rounds interleaved, and each cache's time over float32's per runtime (below 1: faster), and the int8
output's error relative to float32's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

KV_HEADS, HEAD_DIM, QUERY_COLUMNS = 3, 64, 9  # SmolLM2-135M: 3 kv heads of 64, 3 query heads each, 3 frames


class CacheAttention(torch.nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, keys, values, queries):  # [KV, C, D] x2 in self.dtype, [KV, D, Q] float32
        scores = torch.bmm(keys, queries.to(self.dtype)).to(torch.float32)  # [KV, C, Q]
        probs = torch.softmax(scores.transpose(1, 2), dim=-1)  # [KV, Q, C]
        return torch.bmm(probs.to(self.dtype), values).to(torch.float32)  # [KV, Q, D]


def runners(dtype: torch.dtype, slots: int, folder: Path) -> dict:
    """name -> a no-argument callable running the graph once."""
    import onnxruntime as ort
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
        torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
        torch.randn(KV_HEADS, HEAD_DIM, QUERY_COLUMNS, generator=g),
    )
    name = str(dtype).removeprefix("torch.")
    model = CacheAttention(dtype).eval()
    onnx_path = folder / f"attention_{name}.onnx"
    torch.onnx.export(model, args, str(onnx_path), dynamo=True, input_names=["keys", "values", "queries"])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"keys": args[0].numpy(), "values": args[1].numpy(), "queries": args[2].numpy()}
    pte_path = folder / f"attention_{name}.pte"
    program = to_edge_transform_and_lower(torch.export.export(model, args), partitioner=[XnnpackPartitioner()])
    pte_path.write_bytes(program.to_executorch().buffer)
    method = Runtime.get().load_program(str(pte_path)).load_method("forward")
    return {
        f"onnxruntime {name}": lambda: session.run(None, feeds),
        f"executorch {name}": lambda: method.execute(list(args)),
    }


def int8_runner(slots: int, folder: Path):
    """onnxruntime's integer products on an int8 cache [KV, D, C] keys / [KV, C, D] values with per-slot scales:
    scores = (q8 @ k8) * q_scale * k_scale; out = (p8 @ v8) * p_scale, p8 the probabilities times the value
    scales, quantized. Returns the runner and its output's max error relative to the float32 computation."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as h

    kv, d, q, c = KV_HEADS, HEAD_DIM, QUERY_COLUMNS, slots
    nodes = [
        h.make_node("DynamicQuantizeLinear", ["queries"], ["q8", "q_scale", "q_zero"]),
        h.make_node("MatMulInteger", ["q8", "keys", "q_zero"], ["scores32"]),  # [KV, Q, C]
        h.make_node("Cast", ["scores32"], ["scores_raw"], to=TensorProto.FLOAT),
        h.make_node("Mul", ["scores_raw", "q_scale"], ["scores_q"]),
        h.make_node("Mul", ["scores_q", "key_scales"], ["scores"]),
        h.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        h.make_node("Mul", ["probs", "value_scales"], ["weighted"]),
        h.make_node("DynamicQuantizeLinear", ["weighted"], ["p8", "p_scale", "p_zero"]),
        h.make_node("MatMulInteger", ["p8", "values", "p_zero"], ["out32"]),  # [KV, Q, D]
        h.make_node("Cast", ["out32"], ["out_raw"], to=TensorProto.FLOAT),
        h.make_node("Mul", ["out_raw", "p_scale"], ["out"]),
    ]
    inputs = [
        ("queries", TensorProto.FLOAT, [kv, q, d]),
        ("keys", TensorProto.INT8, [kv, d, c]),
        ("key_scales", TensorProto.FLOAT, [kv, 1, c]),
        ("values", TensorProto.INT8, [kv, c, d]),
        ("value_scales", TensorProto.FLOAT, [kv, 1, c]),
    ]
    graph = h.make_graph(
        nodes,
        "int8_cache_attention",
        [h.make_tensor_value_info(*i) for i in inputs],
        [h.make_tensor_value_info("out", TensorProto.FLOAT, [kv, q, d])],
    )
    path = folder / "attention_int8.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    keys, values = (rng.standard_normal((kv, c, d)).astype(np.float32) for _ in range(2))
    queries = rng.standard_normal((kv, q, d)).astype(np.float32)
    k_scale, v_scale = (np.abs(x).max(-1, keepdims=True) / 127 for x in (keys, values))
    keys8 = np.rint(keys / k_scale).astype(np.int8)
    feeds = {
        "queries": queries,
        "keys": np.ascontiguousarray(keys8.transpose(0, 2, 1)),
        "key_scales": np.ascontiguousarray(k_scale.transpose(0, 2, 1)),
        "values": np.rint(values / v_scale).astype(np.int8),
        "value_scales": np.ascontiguousarray(v_scale.transpose(0, 2, 1)),
    }
    scores = queries @ keys.transpose(0, 2, 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    exact = probs / probs.sum(-1, keepdims=True) @ values
    error = float(np.abs(session.run(None, feeds)[0] - exact).max() / np.abs(exact).max())
    return (lambda: session.run(None, feeds)), error


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=1024, help="cache slots S + W (default 1024, edgekv's default)")
    p.add_argument("--calls", type=int, default=400, help="timed calls per variant and round (default 400)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, variants interleaved (default 3)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        int8, int8_error = int8_runner(args.slots, Path(tmp))
        variants = {
            **runners(torch.float32, args.slots, Path(tmp)),
            **runners(torch.float16, args.slots, Path(tmp)),
            "onnxruntime int8": int8,
        }
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, run in variants.items():
                for _ in range(20):
                    run()  # warm-up
                for _ in range(args.calls):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    median = {name: 1e6 * float(np.median(t)) for name, t in times.items()}
    print(f"one layer's decode attention, {args.slots} slots, median of {args.rounds} x {args.calls} calls")
    for name, us in median.items():
        print(f"  {name:22s} {us:8.1f} us")
    for name in median:
        runtime, cache = name.split()
        if cache != "float32":
            ratio = median[name] / median[f"{runtime} float32"]
            print(f"  {runtime}: {cache} cache / float32 cache = {ratio:.2f}x the time")
    print(f"  int8 output error: {int8_error:.3f} x the largest output (random keys, values and queries)")


if __name__ == "__main__":
    main()
