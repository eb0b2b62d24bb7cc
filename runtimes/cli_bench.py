"""`edgekv bench DIR [DIR ...]`: per artifact, decode ms/token at stream positions from the ring's fill up
to N, prefill tokens/s through the chunk entry, peak RSS at each position and size on disk.

The stream really passes through every position (the gaps between timed positions are fed through the
chunk entry, which is exact by the contract), so the numbers at 50,000 are those of a stream that has
wrapped the ring ~50 times. Each artifact runs in a fresh process, so its RSS is its own."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from runtimes.errors import EdgekvError, require
from runtimes.manifest import read_manifest
from runtimes.progress import Bar
from runtimes.traffic import step_bytes_if_readable


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifacts", nargs="+", type=Path, help="exported edgekv folders")
    p.add_argument("--tokens", type=int, default=50_000, help="stream length N (default 50000)")
    p.add_argument("--points", type=int, default=6, help="timed positions from S+W to N (default 6)")
    p.add_argument("--at", help="comma-separated stream positions to time instead of --points")
    p.add_argument("--steps", type=int, default=32, help="one-token decode calls timed per position (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--plot",
        type=Path,
        help="write ms/token and RSS against stream position to this PNG (needs matplotlib: edgekv[plot])",
    )


def timed_positions(capacity: int, tokens: int, points: int, at: str | None, steps: int) -> list[int]:
    if at:
        try:
            pos = sorted(int(x) for x in at.split(","))
        except ValueError:
            raise EdgekvError(f"--at {at!r}: expected comma-separated integers") from None
    else:
        if tokens < capacity + steps:
            raise EdgekvError(
                f"--tokens {tokens} is below the cache size {capacity} + --steps {steps}; "
                "bench measures after the ring fills"
            )
        pos = sorted({int(x) for x in np.linspace(capacity, tokens - steps, max(points, 2)).round()})
    if pos[0] < 0 or any(b - a < steps for a, b in zip(pos, pos[1:], strict=False)):
        raise EdgekvError(f"timed positions {pos} must be >= 0 and at least --steps {steps} apart")
    return pos


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def stream_ids(tokenizer, n: int) -> list[int]:
    """n token ids of the shipped text, repeated as often as needed (content does not change speed)."""
    from runtimes.cli_ppl import DEFAULT_TEXT, read_text, read_tokens

    ids = read_tokens(tokenizer, read_text(DEFAULT_TEXT), 8192, DEFAULT_TEXT)
    return np.resize(np.asarray(ids), n).tolist()


def bench_runner(runner, positions: list[int], steps: int, label: str) -> dict:
    """Stream through `positions[-1] + steps` tokens, timing decode at each position."""
    ids = stream_ids(runner.tokenizer, positions[-1] + steps)
    runner.reset()
    prefill, ms, lo, hi, rss = [], [], [], [], []
    with Bar(len(ids), label) as bar:
        for p in positions:
            while runner.chunk > 1 and runner.pos + runner.chunk <= p:
                start = time.perf_counter()
                runner.feed(ids[runner.pos : runner.pos + runner.chunk])
                prefill.append(time.perf_counter() - start)
                bar.update(runner.chunk)
            while runner.pos < p:
                runner.feed([ids[runner.pos]])
                bar.update(1)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                runner.feed([ids[runner.pos]])
                times.append(time.perf_counter() - start)
            bar.update(steps)
            ms.append(1e3 * float(np.median(times)))
            lo.append(1e3 * float(np.percentile(times, 10)))
            hi.append(1e3 * float(np.percentile(times, 90)))
            rss.append(peak_rss_mb())
    return {
        "positions": positions,
        "ms_per_token": ms,
        "ms_p10": lo,
        "ms_p90": hi,
        "rss_mb": rss,
        "prefill_tok_s": runner.chunk / float(np.median(prefill)) if prefill else None,
    }


def bench_artifact(folder: str, positions: list[int], steps: int) -> dict:
    """One artifact, meant to run in its own process."""
    from runtimes import open_artifact

    runner = open_artifact(Path(folder))
    m = runner.manifest
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    scheme = m.get("quantization", {}).get("scheme", "none")
    result = {
        "artifact": folder,
        "target": m["target"],
        "executor": getattr(runner, "executor", m["target"]),
        "quantization": scheme,
        "name": m["target"] + ("" if scheme == "none" else f"-{scheme}"),
        "sink": m["sink"],
        "window": m["window"],
        "chunk": m["chunk"],
        "size_mb": size / 1e6,
        "load_rss_mb": peak_rss_mb(),
    }
    result.update(bench_runner(runner, positions, steps, m["target"]))
    ms, rss = result["ms_per_token"], result["rss_mb"]
    result["decode_tok_s"] = 1e3 / ms[0]
    result["flat_ms_ratio"] = ms[-1] / ms[0]
    result["rss_growth"] = rss[-1] / rss[0] - 1
    return result


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(args: argparse.Namespace) -> int:
    if args.steps < 3:
        raise EdgekvError("--steps must be at least 3")
    if args.plot:
        require("matplotlib", "plot")  # before the long work, not after it
    plans = []
    for folder in args.artifacts:  # check every folder before the long work starts
        m = read_manifest(folder)
        plans.append((folder, timed_positions(m["sink"] + m["window"], args.tokens, args.points, args.at, args.steps)))
    results = []
    for folder, positions in plans:
        print(f"bench {folder}: decode timed at {positions}", file=sys.stderr)
        # Its own process: reading the graph needs the format's library (onnx, coremltools), which a run-only
        # command keeps out of its process, and the file read stays out of the timed one.
        traffic = in_fresh_process(step_bytes_if_readable, str(folder))
        results.append({**in_fresh_process(bench_artifact, str(folder), positions, args.steps), "step_bytes": traffic})
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps({"steps": args.steps, "results": results}))
    else:
        for r in results:
            print(report(r))
    return 0


def traffic_line(b: dict, ms: float) -> str:
    """What one decode step moves, and the memory bandwidth that would take at `ms` per step."""
    mb = {k: v / 1e6 for k, v in b.items()}
    return (
        f"one decode step moves {mb['total']:.1f} MB (weights {mb['weights']:.1f}, cache {mb['cache_read']:.1f} read "
        f"+ {mb['cache_write']:.2f} written, logits {mb['logits']:.2f}): {b['total'] / ms / 1e6:.1f} GB/s at "
        f"{ms:.2f} ms"
    )


def report(r: dict) -> str:
    prefill = f"{r['prefill_tok_s']:.0f} tok/s" if r["prefill_tok_s"] else "n/a"
    executor = r.get("executor", r["target"])  # the benchmark script's transformers row has none
    target = r["target"] if executor == r["target"] else f"{r['target']} via {executor}, not its speed"
    rows = [
        f"{r['artifact']} ({target}, {r['size_mb']:.1f} MB, cache {r['sink']}+{r['window']}): "
        f"prefill {prefill} (chunk {r['chunk']}), decode {r['decode_tok_s']:.1f} tok/s after the ring fills",
        "  position     " + "".join(f"{p:>12}" for p in r["positions"]),
        "  ms/token     " + "".join(f"{v:>12.2f}" for v in r["ms_per_token"]),
        "  p10-p90      " + "".join(f"{f'{a:.1f}-{b:.1f}':>12}" for a, b in zip(r["ms_p10"], r["ms_p90"], strict=True)),
        "  peak RSS MB  " + "".join(f"{v:>12.0f}" for v in r["rss_mb"]),
        f"  last/first: ms/token x{r['flat_ms_ratio']:.3f}, peak RSS {100 * r['rss_growth']:+.2f} %",
    ]
    if r.get("step_bytes"):
        rows.append("  " + traffic_line(r["step_bytes"], min(r["ms_per_token"])))
    return "\n".join(rows)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_rss) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for r in results:
        label = "/".join(Path(r["artifact"]).parts[-2:])
        ax_ms.errorbar(
            r["positions"],
            r["ms_per_token"],
            marker="o",
            label=label,
            yerr=[np.subtract(r["ms_per_token"], r["ms_p10"]), np.subtract(r["ms_p90"], r["ms_per_token"])],
        )
        ax_rss.plot(r["positions"], r["rss_mb"], marker="o", label=label)
    ax_ms.set(
        ylabel="decode ms/token (median, p10-p90)", ylim=(0, None), title="edgekv: decode cost against stream position"
    )
    ax_rss.set(xlabel="stream position (tokens)", ylabel="peak RSS (MB)", ylim=(0, None))
    ax_ms.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
