"""The NumPy MIL executor's speed on a Core ML package: load, one prefill chunk, one decode token.

    edgekv export --target coreml --out out/smol
    python benchmarks/mil_executor.py out/smol/coreml [--decode 40] [--chunks 4]

Loads the package (weights dequantized once), feeds `--chunks` prefill calls from position 0 and then `--decode`
one-token calls, and prints seconds to load, seconds per prefill chunk (mean) and decode ms/token (median) as one
JSON line. The decode step's cost does not depend on the stream position (fixed shapes, one slot written), so
timing it from the first positions is timing it anywhere.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from runtimes.coreml_runner import MILRunner
from runtimes.manifest import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a Core ML edgekv folder")
    p.add_argument("--decode", type=int, default=40, help="one-token calls timed (default 40)")
    p.add_argument("--chunks", type=int, default=4, help="prefill calls timed (default 4)")
    args = p.parse_args()
    start = time.perf_counter()
    runner = MILRunner(args.folder, read_manifest(args.folder))
    load = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(0, 1000, args.chunks * runner.chunk + args.decode).tolist()
    start = time.perf_counter()
    for i in range(args.chunks):
        runner.feed(ids[i * runner.chunk : (i + 1) * runner.chunk])
    prefill = (time.perf_counter() - start) / args.chunks
    steps = []
    for token in ids[args.chunks * runner.chunk :]:
        start = time.perf_counter()
        runner.feed([token])
        steps.append(time.perf_counter() - start)
    decode = float(np.median(steps))
    print(
        json.dumps(
            {
                "folder": str(args.folder),
                "load_s": round(load, 1),
                "prefill_s_per_chunk": round(prefill, 3),
                "chunk": runner.chunk,
                "decode_ms_per_token": round(1000 * decode, 1),
                "decode_tokens_per_s": round(1 / decode, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
