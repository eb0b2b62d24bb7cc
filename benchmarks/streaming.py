"""Constant memory, measured: every runnable edgekv artifact of SmolLM2 (fp32, int8, int4) side by side with
Hugging Face transformers' eager model and its growing cache, llama.cpp on the same GGUF (where
llama-cpp-python is installed), and the machine's memory read bandwidth; then perplexity of each artifact.

    python benchmarks/streaming.py [--out out/bench] [--tokens 50000] [--json FILE] [--plot FILE.png]
                                   [--schemes none,int8,int4] [--targets executorch,onnx,openvino]
                                   [--ppl-tokens 2000] [--skip speed|quality]

Exports the missing artifacts first (default cache: 4 sink + 1020 window slots, chunk 64), then streams
each one through --tokens positions in its own process, timing one-token decode at the positions below.
transformers and llama.cpp run the same tokens up to 8,192 with their growing caches, and llama.cpp once more
with the artifacts' attention span: S + W slots and its context shift keeping S (llama.cpp's own policy: at a
full context it drops half of the rest, so it attends over between half and all but one of the slots). Medians and
ratios all come from this one run: the machine is shared and noisy, so compare within a run only.
Quality: perplexity of data/tinyshakespeare.txt (sink mode, the artifact's cache), per artifact.
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

from runtimes.cli_bench import bench_artifact, in_fresh_process, peak_rss_mb, plot, report, stream_ids  # noqa: E402

TARGETS = ("executorch", "onnx", "openvino")
HF_POSITIONS = (1024, 4096, 8192)
TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def folder_name(target: str, scheme: str) -> str:
    return target if scheme == "none" else f"{target}-{scheme}"


def export_missing(out: Path, schemes: list[str], targets: list[str]) -> None:
    for scheme in schemes:
        for target in targets:
            if not (out / folder_name(target, scheme) / "edgekv.json").is_file():
                print(f"exporting SmolLM2 to {target} ({scheme}; ExecuTorch takes 4-7 minutes)", file=sys.stderr)
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "exporter.cli",
                        "export",
                        "--target",
                        target,
                        "--quantize",
                        scheme,
                        "--out",
                        str(out),
                    ],
                    check=True,
                )


def shift_context(llm, n_new: int, n_keep: int) -> None:
    """llama.cpp's context shift, as its own CLI does it (tools/main/main.cpp): when n_new more tokens would fill
    the context, keep the first n_keep, drop half of the rest and move the others down (their keys are re-rotated
    at the next decode). llama-cpp-python's `eval` places tokens at `n_tokens`, so that and `input_ids` follow."""
    import llama_cpp

    n_past = llm.n_tokens
    if n_past + n_new < llm.n_ctx():
        return
    mem = llama_cpp.llama_get_memory(llm.ctx)
    n_discard = (n_past - n_keep) // 2
    if not llama_cpp.llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard):
        raise RuntimeError("llama.cpp could not drop part of its cache for a context shift")
    llama_cpp.llama_memory_seq_add(mem, 0, n_keep + n_discard, n_past, -n_discard)
    llm.input_ids[n_keep : n_past - n_discard] = llm.input_ids[n_keep + n_discard : n_past].copy()
    llm.n_tokens = n_past - n_discard


def bench_llamacpp(positions: list[int], steps: int, threads: int, n_ctx: int = 0, n_keep: int = 0) -> dict:
    """llama.cpp (llama-cpp-python) on the GGUF edgekv loads by default, `threads` threads, its own KV cache: growing
    to the last position (n_ctx 0), or n_ctx slots with its context shift keeping the first n_keep tokens (the
    same attention span as an edgekv cache of n_ctx slots, n_keep of them sinks; after a shift it attends over
    between half and all but one of them)."""
    from llama_cpp import Llama, __version__

    from exporter.loaders import load_checkpoint
    from runtimes.manifest import load_tokenizer

    ckpt = load_checkpoint()
    shifting = n_ctx > 0
    llm = Llama(
        model_path=str(ckpt.files[0]),
        n_ctx=n_ctx if shifting else positions[-1] + steps + 64,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        verbose=False,
    )
    ids = stream_ids(load_tokenizer(ckpt.tokenizer_dir), positions[-1] + steps)
    llm.reset()
    fed = 0  # tokens of the stream fed so far (llm.n_tokens drops at each shift)

    def feed(tokens: list[int]) -> None:
        nonlocal fed
        if shifting:
            shift_context(llm, len(tokens), n_keep)
        llm.eval(tokens)
        fed += len(tokens)

    ms, lo, hi, rss, span = [], [], [], [], []
    for p in positions:
        while fed < p:  # not timed; blocks small enough to fit after a shift
            feed(ids[fed : min(p, fed + (n_ctx // 4 if shifting else 512))])
        times, attended = [], []
        for _ in range(steps):
            start = time.perf_counter()
            feed([ids[fed]])
            times.append(time.perf_counter() - start)
            attended.append(llm.n_tokens)
        span.append(float(np.median(attended)))  # tokens in llama.cpp's cache while it decoded
        ms.append(1e3 * float(np.median(times)))
        lo.append(1e3 * float(np.percentile(times, 10)))
        hi.append(1e3 * float(np.percentile(times, 90)))
        rss.append(peak_rss_mb())
    name = f"llama.cpp, n_ctx {n_ctx} shifting" if shifting else "llama.cpp"
    return {
        "artifact": f"{name} ({ckpt.files[0].name})",
        "target": "llama.cpp",
        "name": name,
        "positions": positions,
        "ms_per_token": ms,
        "ms_p10": lo,
        "ms_p90": hi,
        "rss_mb": rss,
        "threads": threads,
        "n_ctx": n_ctx or None,
        "n_keep": n_keep if shifting else None,
        "attended": span,
        "llama_cpp_python_version": __version__,
    }


def artifact_ppl(folder: Path, tokens: int) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter.cli",
            "ppl",
            str(folder),
            "--text",
            str(TEXT),
            "--tokens",
            str(tokens),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


def bench_transformers(positions: list[int], steps: int) -> dict:
    """transformers' eager LlamaForCausalLM (its default attention) with a growing DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from exporter.loaders import load_checkpoint
    from runtimes.manifest import load_tokenizer

    ckpt = load_checkpoint()
    path = ckpt.files[0]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([stream_ids(load_tokenizer(ckpt.tokenizer_dir), positions[-1] + steps)])
    cache, pos, ms, lo, hi, rss = DynamicCache(config=model.config), 0, [], [], [], []
    with torch.inference_mode():
        for p in positions:
            while pos < p:  # fill the cache in chunks; not timed
                n = min(512, p - pos)
                model(ids[:, pos : pos + n], past_key_values=cache, use_cache=True)
                pos += n
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                model(ids[:, pos : pos + 1], past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
                pos += 1
            ms.append(1e3 * float(np.median(times)))
            lo.append(1e3 * float(np.percentile(times, 10)))
            hi.append(1e3 * float(np.percentile(times, 90)))
            rss.append(peak_rss_mb())
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embedding counted once
    cache_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # per cached token, fp32
    return {
        "artifact": "transformers (eager, DynamicCache)",
        "target": "transformers",
        "positions": positions,
        "ms_per_token": ms,
        "ms_p10": lo,
        "ms_p90": hi,
        "rss_mb": rss,
        "weight_bytes": weights,
        "cache_bytes_per_token": cache_bytes,
        "transformers_version": __import__("transformers").__version__,
    }


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
    p.add_argument("--schemes", default="none,int8,int4", help="weight quantizations to include")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"targets to include (default {','.join(TARGETS)})")
    p.add_argument("--ppl-tokens", type=int, default=2000, help="tokens of tinyshakespeare scored per artifact")
    p.add_argument("--skip", choices=("speed", "quality"), help="leave out one half of the benchmark")
    p.add_argument("--json", type=Path, help="write all numbers to this JSON file")
    p.add_argument("--plot", type=Path, help="write ms/token and RSS against position to this PNG")
    args = p.parse_args()
    schemes = args.schemes.split(",")

    targets = args.targets.split(",")
    if unknown := set(targets) - set(TARGETS):
        p.error(f"--targets: {', '.join(sorted(unknown))} not among {', '.join(TARGETS)}")
    export_missing(args.out, schemes, targets)
    folders = [args.out / folder_name(t, s) for s in schemes for t in targets]
    record = {}
    if args.skip != "speed":
        record.update(speed(folders, args))
    if args.skip != "quality":
        record["quality"] = quality(folders, args.ppl_tokens)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def speed(folders: list[Path], args) -> dict:
    import torch

    manifest = json.loads((folders[0] / "edgekv.json").read_text())
    capacity = manifest["sink"] + manifest["window"]
    # 4,096 always: the summary's goals are read there
    positions = sorted({p for p in (capacity, 8192, 16384, 32768) if p < args.tokens} | {4096, args.tokens})
    peer_positions = [capacity, *HF_POSITIONS[1:]]
    print("bench transformers", file=sys.stderr)
    hf = in_fresh_process(bench_transformers, peer_positions, args.steps)
    print(
        report(
            {
                **hf,
                "size_mb": 0,
                "sink": 0,
                "window": hf["positions"][-1],
                "chunk": 512,
                "prefill_tok_s": None,
                "decode_tok_s": 1e3 / hf["ms_per_token"][0],
                "flat_ms_ratio": hf["ms_per_token"][-1] / hf["ms_per_token"][0],
                "rss_growth": hf["rss_mb"][-1] / hf["rss_mb"][0] - 1,
            }
        ),
        file=sys.stderr,
    )
    peers = [hf]
    try:
        import llama_cpp  # noqa: F401  a benchmark peer, not a dependency
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp left out", file=sys.stderr)
    else:
        threads = torch.get_num_threads()
        print("bench llama.cpp, growing cache", file=sys.stderr)
        peers.append(in_fresh_process(bench_llamacpp, peer_positions, args.steps, threads))
        print(f"bench llama.cpp, {capacity} slots with its context shift keeping {manifest['sink']}", file=sys.stderr)
        peers.append(in_fresh_process(bench_llamacpp, peer_positions, args.steps, threads, capacity, manifest["sink"]))
        for peer in peers[1:]:
            print(
                f"{peer['name']}: ms/token {peer['ms_per_token']} at {peer['positions']}, attending over "
                f"{peer['attended']} tokens",
                file=sys.stderr,
            )
    results = []
    for folder in folders:
        print(f"bench {folder}: decode timed at {positions}", file=sys.stderr)
        results.append(in_fresh_process(bench_artifact, str(folder), positions, args.steps))
        print(report(results[-1]), file=sys.stderr)
    bw = read_bandwidth()
    summary = summarize(results, peers, bw, capacity)
    print(summary["text"])
    if args.plot:
        plot([*results, *peers], args.plot)
    return {
        "results": results,
        "transformers": hf,
        "peers": peers,
        "bandwidth_gb_s": bw,
        "summary": {k: v for k, v in summary.items() if k != "text"},
    }


def quality(folders: list[Path], tokens: int) -> dict:
    """Perplexity per artifact, and each quantized one against the fp32 artifact of its target."""
    ppl = {}
    for folder in folders:
        print(f"perplexity of {TEXT.name} through {folder}", file=sys.stderr)
        ppl[folder.name] = artifact_ppl(folder, tokens)
    lines = [f"perplexity, {TEXT.name}, first {tokens} tokens, sink mode, cache of the artifact:"]
    for name, r in ppl.items():
        base = ppl.get(name.split("-")[0])
        change = f"  ({100 * (r['ppl'] / base['ppl'] - 1):+.2f}% vs fp32)" if base and base is not r else ""
        lines.append(f"  {name:<18} {r['ppl']:.3f}{change}")
    print("\n".join(lines))
    return ppl


def at(r: dict, position: int) -> float:
    return r["ms_per_token"][r["positions"].index(position)]


def summarize(results: list[dict], peers: list[dict], bw: dict, capacity: int) -> dict:
    hf = peers[0]
    last = results[0]["positions"][-1]
    # One decode step reads every weight once and the whole fixed cache (fp32 artifacts).
    step_bytes = hf["weight_bytes"] + hf["cache_bytes_per_token"] * capacity
    floor_ms = 1e3 * step_bytes / (max(bw["one_thread"], bw["all_threads"]) * 1e9)
    fp32 = [r for r in results if r["quantization"] == "none"]
    s = {"per_target": {}}
    if fp32:  # the fp32 goals (a run of quantized artifacts alone has only their lines)
        s["floor_ms"], s["step_bytes"] = floor_ms, step_bytes
        fastest = min(fp32, key=lambda r: at(r, 4096))
        s["fastest"] = fastest["target"]
        s["speedup_vs_transformers_4096"] = at(hf, 4096) / at(fastest, 4096)
        s["fastest_over_floor"] = at(fastest, 4096) / floor_ms
    w = max(18, *(len(x.get("name", x["target"])) + 1 for x in [*results, *peers]))  # the name column
    lines = [
        f"{'artifact':<{w}}{'size MB':>9}{'prefill tok/s':>15}{'prefill/decode':>16}"
        + "".join(f"{'ms@' + str(p):>10}" for p in results[0]["positions"])
        + f"{'ms ratio':>10}{'RSS MB':>9}{'RSS growth':>12}"
    ]
    for r in results:
        speed = r["prefill_tok_s"] / r["decode_tok_s"]
        s["per_target"][r["name"]] = {
            "flat_ms_ratio": r["flat_ms_ratio"],
            "rss_growth": r["rss_growth"],
            "prefill_over_decode": speed,
        }
        lines.append(
            f"{r['name']:<{w}}{r['size_mb']:>9.1f}{r['prefill_tok_s']:>15.0f}{speed:>15.1f}x"
            + "".join(f"{v:>10.2f}" for v in r["ms_per_token"])
            + f"{r['flat_ms_ratio']:>9.3f}x{r['rss_mb'][-1]:>9.0f}{100 * r['rss_growth']:>+11.2f}%"
        )
    for peer in peers:
        lines.append(
            f"{peer.get('name', peer['target']):<{w}}{'':>9}{'':>15}{'':>16}"
            + "".join(
                f"{at(peer, p):>10.2f}" if p in peer["positions"] else f"{'-':>10}" for p in results[0]["positions"]
            )
            + f"{at(peer, 8192) / at(peer, capacity):>9.3f}x{peer['rss_mb'][-1]:>9.0f}"
            + f"{100 * (peer['rss_mb'][-1] / peer['rss_mb'][0] - 1):>+11.2f}%"
        )
    lines += [
        "",
        f"memory read bandwidth: {bw['one_thread']:.1f} GB/s one thread, {bw['all_threads']:.1f} GB/s "
        f"{bw['threads']} threads",
        f"flat (ms/token at {last} vs {capacity}): "
        + ", ".join(f"{r['name']} x{r['flat_ms_ratio']:.3f}" for r in results)
        + "  (goal <= 1.10)",
        "RSS growth over the same span: "
        + ", ".join(f"{r['name']} {100 * r['rss_growth']:+.2f}%" for r in results)
        + "  (goal <= 2%)",
        "prefill vs one-token decode: "
        + ", ".join(f"{t} {v['prefill_over_decode']:.1f}x" for t, v in s["per_target"].items())
        + "  (goal >= 5x)",
    ]
    if fp32:
        lines += [
            f"bandwidth floor per fp32 decode step: {step_bytes / 1e6:.0f} MB (weights + fixed cache) / "
            f"{max(bw['one_thread'], bw['all_threads']):.1f} GB/s = {floor_ms:.1f} ms",
            f"fastest at 4096: {fastest['target']} {at(fastest, 4096):.2f} ms/token; transformers "
            f"{at(hf, 4096):.2f} ms/token -> {s['speedup_vs_transformers_4096']:.2f}x faster  (goal >= 2x)",
            f"fastest vs bandwidth floor: {s['fastest_over_floor']:.2f}x the floor  (goal <= 1.5x)",
        ]
    lines += quantized_lines(results, peers, s)
    s["text"] = "\n".join(lines)
    return s


def quantized_lines(results: list[dict], peers: list[dict], s: dict) -> list[str]:
    """int4/int8 against fp32 of the same target at 4096, and the fastest int4 against llama.cpp."""
    by_name = {r["name"]: r for r in results}
    lines, s["quantized_speedup_4096"] = [], {}
    for r in results:
        base = by_name.get(r["target"])
        if r["quantization"] != "none" and base:
            s["quantized_speedup_4096"][r["name"]] = at(base, 4096) / at(r, 4096)
    if s["quantized_speedup_4096"]:
        lines.append(
            "quantized vs fp32 of the same target at 4096: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in s["quantized_speedup_4096"].items())
            + "  (goal: int4 >= 2x on two targets)"
        )
    int4 = [r for r in results if r["quantization"] == "int4"]
    if not int4:
        return lines
    for peer in (p for p in peers if p["target"] == "llama.cpp"):
        shared = [p for p in peer["positions"] if all(p in r["positions"] for r in int4)]
        best = {p: min(int4, key=lambda r, p=p: at(r, p)) for p in shared}
        ratios = {p: at(peer, p) / at(best[p], p) for p in shared}
        s.setdefault("fastest_int4_vs_llamacpp", {})[peer["name"]] = {str(p): v for p, v in ratios.items()}
        lines.append(
            f"fastest int4 against {peer['name']} ({peer['threads']} threads), its ms/token over edgekv's: "
            + ", ".join(
                f"@{p} {best[p]['name']} {at(best[p], p):.2f} vs {at(peer, p):.2f} = {v:.2f}x"
                for p, v in ratios.items()
            )
            + "  (goal >= 1.0)"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
