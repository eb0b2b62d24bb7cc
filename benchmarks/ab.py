"""Exports of one model timed against each other in one process, rounds interleaved: for a change whose effect is
smaller than the machine's noise between separate runs (`edgekv bench` runs each artifact in its own process).

    python benchmarks/ab.py BEFORE AFTER [...] [--at 2048] [--rounds 8] [--steps 24] [--json FILE]

Every artifact is fed the same text (data/tinyshakespeare.txt) to position `--at`, then each round gives each
artifact in turn one prefill chunk and `--steps` decode calls, each call timed, all at the same positions (the
cache full and wrapping throughout when `--at` is past S + W). Prints per artifact the median ms per decode call
and prefill tokens/s over all rounds, and each one's decode time over the first artifact's (below 1: faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from runtimes import open_artifact

TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", help="exported edgekv folders of the same model")
    p.add_argument("--at", type=int, default=2048, help="stream position the rounds start at (default 2048)")
    p.add_argument("--rounds", type=int, default=8, help="rounds, artifacts interleaved (default 8)")
    p.add_argument("--steps", type=int, default=24, help="timed decode calls per artifact and round (default 24)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    runners = [open_artifact(Path(a)) for a in args.artifacts]
    chunk = runners[0].chunk
    need = args.at + args.rounds * (chunk + args.steps)
    ids = runners[0].tokenizer.encode(TEXT.read_text()).ids
    ids = (ids * (need // len(ids) + 1))[:need]
    for r in runners:
        r.feed(ids[: args.at])
    decode = [[] for _ in runners]
    prefill = [[] for _ in runners]
    pos = args.at
    for _ in range(args.rounds):
        for r, d, f in zip(runners, decode, prefill, strict=True):
            t0 = time.perf_counter()
            r.feed(ids[pos : pos + chunk])
            f.append(chunk / (time.perf_counter() - t0))
            for t in ids[pos + chunk : pos + chunk + args.steps]:
                t0 = time.perf_counter()
                r.feed([t])
                d.append((time.perf_counter() - t0) * 1e3)
        pos += chunk + args.steps
    base = statistics.median(decode[0])
    results = []
    print(f"{args.rounds} rounds from position {args.at}: {args.steps} decode calls and a {chunk}-token chunk each")
    for a, d, f in zip(args.artifacts, decode, prefill, strict=True):
        ms = statistics.median(d)
        row = {"artifact": a, "decode_ms": ms, "decode_ratio": ms / base, "prefill_tok_s": statistics.median(f)}
        results.append(row)
        print(f"{a}: decode {ms:.2f} ms ({ms / base:.3f}x the first), prefill {row['prefill_tok_s']:.0f} tok/s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"at": args.at, "rounds": args.rounds, "steps": args.steps, "results": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
