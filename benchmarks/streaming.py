"""Constant memory, measured: every runnable edgekv artifact of SmolLM2 (fp32) side by side with Hugging
Face transformers' eager model and its growing cache, and the machine's memory read bandwidth.

    python benchmarks/streaming.py [--out out/bench] [--tokens 50000] [--json FILE] [--plot FILE.png]

Exports the missing artifacts first (default cache: 4 sink + 1020 window slots, chunk 64), then streams
each one through --tokens positions in its own process, timing one-token decode at the positions below.
transformers runs the same tokens up to its trained context (8,192) with its DynamicCache. Medians and
ratios all come from this one run: the machine is shared and noisy, so compare within a run only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.bench import bench_artifact, in_fresh_process, peak_rss_mb, plot, report, stream_ids  # noqa: E402

TARGETS = ("executorch", "onnx", "openvino")
HF_POSITIONS = (1024, 4096, 8192)


def export_missing(out: Path) -> None:
    for target in TARGETS:
        if not (out / target / "edgekv.json").is_file():
            print(f"exporting SmolLM2 to {target} (ExecuTorch takes ~4 minutes)", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "exporter.cli", "export", "--target", target, "--out", str(out)],
                           check=True)


def bench_transformers(positions: list[int], steps: int) -> dict:
    """transformers' eager LlamaForCausalLM (its default attention) with a growing DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from exporter.loaders import load_checkpoint, load_tokenizer

    ckpt = load_checkpoint()
    path = ckpt.files[0]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([stream_ids(load_tokenizer(ckpt.tokenizer_dir), positions[-1] + steps)])
    cache, pos, ms, lo, hi, rss = DynamicCache(config=model.config), 0, [], [], [], []
    with torch.inference_mode():
        for p in positions:
            while pos < p:  # fill the cache in chunks; not timed
                n = min(512, p - pos)
                model(ids[:, pos:pos + n], past_key_values=cache, use_cache=True)
                pos += n
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                model(ids[:, pos:pos + 1], past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                pos += 1
            ms.append(1e3 * float(np.median(times)))
            lo.append(1e3 * float(np.percentile(times, 10)))
            hi.append(1e3 * float(np.percentile(times, 90)))
            rss.append(peak_rss_mb())
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embedding counted once
    cache_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # per cached token, fp32
    return {"artifact": "transformers (eager, DynamicCache)", "target": "transformers", "positions": positions,
            "ms_per_token": ms, "ms_p10": lo, "ms_p90": hi, "rss_mb": rss, "weight_bytes": weights,
            "cache_bytes_per_token": cache_bytes, "transformers_version": __import__("transformers").__version__}


def read_bandwidth(mb: int = 512, repeats: int = 7) -> dict:
    """GB/s reading a buffer much larger than the caches: numpy (one thread) and torch (all threads)."""
    import torch

    a = np.ones(mb * 2**20 // 8)
    t = torch.from_numpy(a)
    result = {}
    for name, fn in (("one_thread", a.sum), ("all_threads", t.sum)):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = a.nbytes / float(np.median(times)) / 1e9
    result["threads"] = torch.get_num_threads()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="artifact folder root (default out/bench)")
    p.add_argument("--tokens", type=int, default=50_000, help="stream length for the edgekv artifacts")
    p.add_argument("--steps", type=int, default=32, help="decode calls timed per position")
    p.add_argument("--json", type=Path, help="write all numbers to this JSON file")
    p.add_argument("--plot", type=Path, help="write ms/token and RSS against position to this PNG")
    args = p.parse_args()

    export_missing(args.out)
    capacity = json.loads((args.out / "onnx" / "edgekv.json").read_text())
    capacity = capacity["sink"] + capacity["window"]
    positions = sorted({capacity, 4096, 8192, 16384, 32768, args.tokens})
    print("bench transformers", file=sys.stderr)
    hf = in_fresh_process(bench_transformers, [capacity, *HF_POSITIONS[1:]], args.steps)
    print(report({**hf, "size_mb": 0, "sink": 0, "window": hf["positions"][-1], "chunk": 512,
                  "prefill_tok_s": None, "decode_tok_s": 1e3 / hf["ms_per_token"][0],
                  "flat_ms_ratio": hf["ms_per_token"][-1] / hf["ms_per_token"][0],
                  "rss_growth": hf["rss_mb"][-1] / hf["rss_mb"][0] - 1}), file=sys.stderr)
    results = []
    for target in TARGETS:
        print(f"bench {target}: decode timed at {positions}", file=sys.stderr)
        results.append(in_fresh_process(bench_artifact, str(args.out / target), positions, args.steps))
        print(report(results[-1]), file=sys.stderr)
    bw = read_bandwidth()
    summary = summarize(results, hf, bw, capacity)
    print(summary["text"])
    if args.json:
        args.json.write_text(json.dumps({"results": results, "transformers": hf, "bandwidth_gb_s": bw,
                                         "summary": {k: v for k, v in summary.items() if k != "text"}}, indent=1))
    if args.plot:
        plot([*results, hf], args.plot)
    return 0


def at(r: dict, position: int) -> float:
    return r["ms_per_token"][r["positions"].index(position)]


def summarize(results: list[dict], hf: dict, bw: dict, capacity: int) -> dict:
    last = results[0]["positions"][-1]
    # One decode step reads every weight once and the whole fixed cache (fp32 artifacts).
    step_bytes = hf["weight_bytes"] + hf["cache_bytes_per_token"] * capacity
    floor_ms = 1e3 * step_bytes / (max(bw["one_thread"], bw["all_threads"]) * 1e9)
    fastest = min(results, key=lambda r: at(r, 4096))
    s = {"floor_ms": floor_ms, "step_bytes": step_bytes, "fastest": fastest["target"],
         "speedup_vs_transformers_4096": at(hf, 4096) / at(fastest, 4096),
         "fastest_over_floor": at(fastest, 4096) / floor_ms, "per_target": {}}
    lines = [f"{'target':<12}{'size MB':>9}{'prefill tok/s':>15}{'prefill/decode':>16}"
             + "".join(f"{'ms@' + str(p):>10}" for p in results[0]["positions"])
             + f"{'ms ratio':>10}{'RSS MB':>9}{'RSS growth':>12}"]
    for r in results:
        speed = r["prefill_tok_s"] / r["decode_tok_s"]
        s["per_target"][r["target"]] = {"flat_ms_ratio": r["flat_ms_ratio"], "rss_growth": r["rss_growth"],
                                        "prefill_over_decode": speed}
        lines.append(f"{r['target']:<12}{r['size_mb']:>9.1f}{r['prefill_tok_s']:>15.0f}{speed:>15.1f}x"
                     + "".join(f"{v:>10.2f}" for v in r["ms_per_token"])
                     + f"{r['flat_ms_ratio']:>9.3f}x{r['rss_mb'][-1]:>9.0f}{100 * r['rss_growth']:>+11.2f}%")
    lines.append(f"{'transformers':<12}{'':>9}{'':>15}{'':>16}"
                 + "".join(f"{at(hf, p):>10.2f}" if p in hf["positions"] else f"{'-':>10}"
                           for p in results[0]["positions"])
                 + f"{at(hf, 8192) / at(hf, capacity):>9.3f}x{hf['rss_mb'][-1]:>9.0f}"
                 + f"{100 * (hf['rss_mb'][-1] / hf['rss_mb'][0] - 1):>+11.2f}%")
    lines += [
        "",
        f"memory read bandwidth: {bw['one_thread']:.1f} GB/s one thread, {bw['all_threads']:.1f} GB/s "
        f"{bw['threads']} threads",
        f"bandwidth floor per decode step: {step_bytes / 1e6:.0f} MB (weights + fixed cache) / "
        f"{max(bw['one_thread'], bw['all_threads']):.1f} GB/s = {floor_ms:.1f} ms",
        f"flat (ms/token at {last} vs {capacity}): "
        + ", ".join(f"{r['target']} x{r['flat_ms_ratio']:.3f}" for r in results) + "  (goal <= 1.10)",
        "RSS growth over the same span: "
        + ", ".join(f"{r['target']} {100 * r['rss_growth']:+.2f}%" for r in results) + "  (goal <= 2%)",
        f"fastest at 4096: {fastest['target']} {at(fastest, 4096):.2f} ms/token; transformers "
        f"{at(hf, 4096):.2f} ms/token -> {s['speedup_vs_transformers_4096']:.2f}x faster  (goal >= 2x)",
        f"fastest vs bandwidth floor: {s['fastest_over_floor']:.2f}x the floor  (goal <= 1.5x)",
        "prefill vs one-token decode: "
        + ", ".join(f"{t} {v['prefill_over_decode']:.1f}x" for t, v in s["per_target"].items()) + "  (goal >= 5x)",
    ]
    s["text"] = "\n".join(lines)
    return s


if __name__ == "__main__":
    sys.exit(main())
