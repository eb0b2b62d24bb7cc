"""A lighter cache read from memory, on onnxruntime: 30 layers of decode attention over caches of their own, in
float32, in float16 cast to float32 inside the graph, and in int8 (one scale per slot) cast the same way.

    python benchmarks/kv_cast.py [--slots 1024] [--calls 50] [--rounds 7]

benchmarks/attention_precision.py times one layer, whose 1.5 MB cache stays in the CPU's caches from call to call,
and its float16 variant runs the products in float16. Here every layer has its own cache (47 MB in float32 at
SmolLM2's 30 x 3 heads x 1,024 slots x 64), so each call reads them from memory as a decode step does, and the
products stay float32: the lighter caches save bytes read from memory and pay for the conversion. Each layer is
keys @ queries (three rope frames: 9 columns), softmax over the slots, probabilities @ values; the int8 cache
scales the scores by each slot's key scale and the probabilities by each slot's value scale. The caches are bound
once (IO binding), as the runner binds them. Prints each variant's median ms per call (rounds interleaved), its
time over float32's, and its output's error over the largest float32 output; and, for scale, how fast NumPy
sums the float32 caches on one thread (a read of the same bytes from memory).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h

LAYERS, KV_HEADS, HEAD_DIM, QUERY_COLUMNS = 30, 3, 64, 9  # SmolLM2-135M
FLOAT, HALF, INT8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8


def variant(kind: str, keys: np.ndarray, values: np.ndarray, queries: np.ndarray):
    """A session computing every layer's attention and their sum, with its IO binding; the caches in `kind`."""
    slots = keys.shape[2]
    nodes, feeds, outs = [], {"q": queries}, []
    for j in range(LAYERS):
        k, v = f"k{j}", f"v{j}"
        if kind == "float32":
            feeds[k], feeds[v] = keys[j], values[j]
            kf, vf = k, v
        else:
            if kind == "float16":
                feeds[k], feeds[v] = keys[j].astype(np.float16), values[j].astype(np.float16)
            else:
                k_scale, v_scale = (np.abs(x[j]).max(-1, keepdims=True) / 127 for x in (keys, values))
                feeds[k], feeds[v] = (
                    np.rint(x[j] / s).astype(np.int8) for x, s in ((keys, k_scale), (values, v_scale))
                )
                feeds[k + "s"] = k_scale.astype(np.float32)  # [KV, C, 1]: scales the scores [KV, C, Q]
                feeds[v + "s"] = v_scale.reshape(KV_HEADS, 1, slots).astype(np.float32)  # the probabilities [KV, Q, C]
            kf, vf = k + "f", v + "f"
            nodes += [h.make_node("Cast", [k], [kf], to=FLOAT), h.make_node("Cast", [v], [vf], to=FLOAT)]
        scores, probs = f"s{j}", f"p{j}"
        nodes.append(h.make_node("MatMul", [kf, "q"], [scores]))
        if kind == "int8":
            nodes.append(h.make_node("Mul", [scores, k + "s"], [scores + "x"]))
            scores += "x"
        nodes += [
            h.make_node("Transpose", [scores], [f"t{j}"], perm=[0, 2, 1]),
            h.make_node("Softmax", [f"t{j}"], [probs], axis=-1),
        ]
        if kind == "int8":
            nodes.append(h.make_node("Mul", [probs, v + "s"], [probs + "x"]))
            probs += "x"
        nodes.append(h.make_node("MatMul", [probs, vf], [f"o{j}"]))
        outs.append(f"o{j}")
    nodes.append(h.make_node("Sum", outs, ["out"]))
    dtype = {np.dtype(np.float32): FLOAT, np.dtype(np.float16): HALF, np.dtype(np.int8): INT8}
    inputs = [h.make_tensor_value_info(name, dtype[a.dtype], list(a.shape)) for name, a in feeds.items()]
    output = h.make_tensor_value_info("out", FLOAT, [KV_HEADS, QUERY_COLUMNS, HEAD_DIM])
    model = h.make_model(h.make_graph(nodes, kind, inputs, [output]), opset_imports=[h.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    binding.bind_output("out")
    return session, binding


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=1024, help="cache slots S + W (default 1024, edgekv's default)")
    p.add_argument("--calls", type=int, default=50, help="timed calls per variant and round (default 50)")
    p.add_argument("--rounds", type=int, default=7, help="rounds, variants interleaved (default 7)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    keys, values = (rng.standard_normal((LAYERS, KV_HEADS, args.slots, HEAD_DIM), np.float32) for _ in range(2))
    queries = 0.1 * rng.standard_normal((KV_HEADS, HEAD_DIM, QUERY_COLUMNS), np.float32)
    variants = {kind: variant(kind, keys, values, queries) for kind in ("float32", "float16", "int8")}
    outputs = {}
    for kind, (session, binding) in variants.items():
        session.run_with_iobinding(binding)
        outputs[kind] = binding.copy_outputs_to_cpu()[0]
    times = {kind: [] for kind in variants}
    for _ in range(args.rounds):
        for kind, (session, binding) in variants.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                session.run_with_iobinding(binding)
            times[kind].append((time.perf_counter() - start) / args.calls)
    base, scale = float(np.median(times["float32"])), float(np.abs(outputs["float32"]).max())
    mb = LAYERS * 2 * KV_HEADS * args.slots * HEAD_DIM * 4 / 1e6
    print(
        f"{LAYERS} layers' decode attention, {args.slots} slots ({mb:.1f} MB in float32), onnxruntime "
        f"{ort.__version__}, median of {args.rounds} rounds x {args.calls} calls"
    )
    start = time.perf_counter()
    for _ in range(args.calls):
        keys.sum(), values.sum()
    read = (time.perf_counter() - start) / args.calls
    for kind, t in times.items():
        error = float(np.abs(outputs[kind] - outputs["float32"]).max()) / scale
        print(
            f"  {kind:8s} cache {1e3 * float(np.median(t)):7.2f} ms  {float(np.median(t)) / base:.2f}x float32's "
            f"time, error {error:.1e} of the largest output"
        )
    print(
        f"  NumPy sums the float32 caches in {1e3 * read:.2f} ms on one thread: {mb / 1e3 / read:.1f} GB/s; "
        f"float32's attention reads them at {mb / 1e3 / base:.1f} GB/s"
    )


if __name__ == "__main__":
    main()
