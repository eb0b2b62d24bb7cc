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

`--fused` adds each runtime's fused attention op over the same float32 cache, for issue 38's "fused attention per
backend": onnxruntime's `Attention` (opset 23), ExecuTorch's `llama::custom_sdpa` (the wheel's custom ops, the
kernel its own LLM export uses) and OpenVINO's `ScaledDotProductAttention` (opset 13), with edgekv's graph on
OpenVINO beside it. A fused op takes a query in one rotary frame (3 query heads per kv head, not 9 columns) and a
float mask over the slots; it reads the cache where it lies, so the current token's key must already be in it.
The fused op's time is what one call over the cache costs; edgekv's graph adds the frames' masks and the
chunk's own key, which this graph leaves out (so its time here is a lower bound of edgekv's).
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


def graph_args(dtype: torch.dtype, slots: int) -> tuple:
    """CacheAttention's inputs: keys and values [KV, C, D] in `dtype`, queries [KV, D, Q] float32 (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
        torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
        torch.randn(KV_HEADS, HEAD_DIM, QUERY_COLUMNS, generator=g),
    )


def runners(dtype: torch.dtype, slots: int, folder: Path) -> dict:
    """name -> a no-argument callable running the graph once."""
    import onnxruntime as ort
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    args = graph_args(dtype, slots)
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


def fused_runners(slots: int, folder: Path) -> dict:
    """Each runtime's fused attention op over a float32 cache [1, KV, C, D] (ExecuTorch: [1, C, KV, D]), one token's
    query [1, H, 1, D], an all-zero float mask [1, C]; plus edgekv's float32 graph on OpenVINO. name -> (callable,
    the output's max error against NumPy relative to its largest value)."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  registers llama::custom_sdpa
    import onnx
    import onnxruntime as ort
    import openvino as ov
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from onnx import TensorProto
    from onnx import helper as h
    from openvino import opset13

    kv, d, c = KV_HEADS, HEAD_DIM, slots
    heads = kv * QUERY_COLUMNS // 3  # query heads: 3 frames per head in edgekv's graph, one in a fused op
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, heads, 1, d)).astype(np.float32)
    k, v = (rng.standard_normal((1, kv, c, d)).astype(np.float32) for _ in range(2))
    mask = np.zeros((1, c), np.float32)
    g = heads // kv
    scores = q.reshape(kv, g, d) @ k[0].transpose(0, 2, 1) / np.sqrt(d)  # [KV, G, C]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    exact = (probs / probs.sum(-1, keepdims=True) @ v[0]).reshape(1, heads, 1, d)

    def error(out) -> float:
        return float(np.abs(np.asarray(out).reshape(exact.shape) - exact).max() / np.abs(exact).max())

    found = {}
    # onnxruntime: the standard Attention op (4-D inputs: the head counts come from the shapes, GQA by kv heads).
    inputs = [("q", [1, heads, 1, d]), ("k", [1, kv, c, d]), ("v", [1, kv, c, d]), ("mask", [1, c])]
    graph = h.make_graph(
        [h.make_node("Attention", ["q", "k", "v", "mask"], ["out"])],
        "fused_attention",
        [h.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [h.make_tensor_value_info("out", TensorProto.FLOAT, [1, heads, 1, d])],
    )
    path = folder / "attention_fused.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 23)]), str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"q": q, "k": k, "v": v, "mask": mask}
    found["onnxruntime fused"] = (lambda: session.run(None, feeds)), error(session.run(None, feeds)[0])

    # ExecuTorch: custom_sdpa takes [B, S, H, D] and the mask as float [T, C], start_pos 0, not causal.
    class CustomSdpa(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.ops.llama.custom_sdpa(q, k, v, 0, mask, 0.0, False, None)

    args = tuple(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
    args = (*args, torch.from_numpy(mask))
    program = to_edge_transform_and_lower(torch.export.export(CustomSdpa(), args), partitioner=[XnnpackPartitioner()])
    pte_path = folder / "attention_fused.pte"
    pte_path.write_bytes(program.to_executorch().buffer)
    method = Runtime.get().load_program(str(pte_path)).load_method("forward")
    out = method.execute(list(args))[0].numpy().transpose(0, 2, 1, 3)
    found["executorch fused"] = (lambda: method.execute(list(args))), error(out)

    # OpenVINO: opset 13 SDPA has no grouped heads; one token's G query heads ride the query's sequence axis.
    core = ov.Core()
    params = [ov.op.Parameter(ov.Type.f32, ov.Shape(s)) for s in ([1, kv, g, d], [1, kv, c, d], [1, kv, c, d])]
    sdpa = opset13.scaled_dot_product_attention(*params, attention_mask=mask.reshape(1, 1, 1, c))
    compiled = core.compile_model(ov.Model([sdpa], params), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    feeds_ov = [q.reshape(1, kv, g, d), k, v]
    found["openvino fused"] = (lambda: request.infer(feeds_ov)), error(request.infer(feeds_ov)[0])
    layers = {op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()}
    print(f"  openvino fused: the CPU plugin's runtime graph runs it as {sorted(layers - {'Input', 'Output'})}")

    # edgekv's float32 graph (CacheAttention) on OpenVINO, from its ONNX file, for a row to set the fused one against.
    unfused = core.compile_model(
        core.read_model(str(folder / "attention_float32.onnx")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    request_unfused = unfused.create_infer_request()
    feeds_unfused = [a.numpy() for a in graph_args(torch.float32, slots)]
    found["openvino float32"] = (lambda: request_unfused.infer(feeds_unfused)), 0.0
    return found


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
    p.add_argument("--fused", action="store_true", help="also each runtime's fused attention op (float32 cache)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        int8, int8_error = int8_runner(args.slots, Path(tmp))
        variants = {
            **runners(torch.float32, args.slots, Path(tmp)),
            **runners(torch.float16, args.slots, Path(tmp)),
            "onnxruntime int8": int8,
        }
        errors = {}
        if args.fused:
            for name, (run, err) in fused_runners(args.slots, Path(tmp)).items():
                variants[name], errors[name] = run, err
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
        if cache == "fused":
            ratio = median[name] / median[f"{runtime} float32"]
            print(f"  {runtime}: fused op / edgekv's float32 graph = {ratio:.2f}x the time (error {errors[name]:.1e})")
        elif cache != "float32":
            ratio = median[name] / median[f"{runtime} float32"]
            print(f"  {runtime}: {cache} cache / float32 cache = {ratio:.2f}x the time")
    print(f"  int8 output error: {int8_error:.3f} x the largest output (random keys, values and queries)")


if __name__ == "__main__":
    main()
