"""What a half-precision KV cache would buy on this CPU: one layer's decode attention against the cache, with the
cache in float32 and in float16, in onnxruntime and in ExecuTorch (XNNPACK), at SmolLM2's shapes.

    python benchmarks/attention_precision.py [--slots 1024] [--calls 400] [--rounds 3]

The graph is the cache part of exporter.model.Attention for one token: scores = keys @ queries (the query in
its three rope frames, G*3 = 9 columns), softmax over the slots, then probabilities @ values. A float16 cache
halves the bytes read; the products take float16 operands and return float32. Prints the median microseconds
per call of each variant, rounds interleaved, and the ratio float16 / float32 per runtime (below 1: faster).
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
    args = (torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
            torch.randn(KV_HEADS, slots, HEAD_DIM, generator=g).to(dtype),
            torch.randn(KV_HEADS, HEAD_DIM, QUERY_COLUMNS, generator=g))
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
    return {f"onnxruntime {name}": lambda: session.run(None, feeds),
            f"executorch {name}": lambda: method.execute(list(args))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=1024, help="cache slots S + W (default 1024, edgekv's default)")
    p.add_argument("--calls", type=int, default=400, help="timed calls per variant and round (default 400)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, variants interleaved (default 3)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {**runners(torch.float32, args.slots, Path(tmp)), **runners(torch.float16, args.slots, Path(tmp))}
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
    for runtime in ("onnxruntime", "executorch"):
        ratio = median[f"{runtime} float16"] / median[f"{runtime} float32"]
        print(f"  {runtime}: float16 cache / float32 cache = {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
