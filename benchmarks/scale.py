"""Big models on a small machine: export, peak memory, size and decode speed of random checkpoints with the shapes
of Llama-3.2-1B and Mistral-7B.

    python benchmarks/scale.py --shape 1b --targets onnx,openvino,executorch,coreml --schemes int4,none \
        --work /tmp/scale [--positions 1024,4096] [--json out.json]

Writes the checkpoint itself (sharded bf16 safetensors, fixed seed, a word-level tokenizer) unless it exists, then
exports each target x scheme in its own process (`edgekv export`, window 124 unless --window), measuring wall time
and peak RSS of that process, the artifact's size, and decode ms/token at each position (a runnable target's
runner, the stream fed up to the position in prefill chunks; its RSS after each); with --validate, `edgekv
validate`'s wall and peak RSS too. With --llama-cpp, llama.cpp on the same weights beside them: llama.cpp's own
converter and quantizer from the llama-cpp-python source distribution, decode timed the same way, with its growing
cache and with edgekv's span (n_ctx = 4 + W, its context shift keeping 4), flash attention off and on. Prints a
markdown table.

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36 -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama && pip install /tmp/llama/llama_cpp_python-0.3.36
    python benchmarks/scale.py --shape 1b --targets onnx,executorch --schemes int4 --positions 1024,4096,8192 \
        --window 1020 --llama-cpp /tmp/llama/llama_cpp_python-0.3.36

(On a CPU with AMX, build llama-cpp-python without it, as docs/benchmarks.md's race says: natively built, it
stops on an illegal instruction.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.streaming import read_bandwidth, shift_context  # noqa: E402

# name -> Hugging Face config fields (random weights: only the shapes are the real models')
SHAPES = {
    "1b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "7b": dict(
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        sliding_window=None,
    ),
}
SHARD_BYTES = 2 << 30


def write_checkpoint(folder: Path, fields: dict, seed: int = 0) -> Path:
    """A Hugging Face folder with random bf16 weights (normal, std 0.02; norms 1) of this config, in shards of at most
    2 GiB, written one tensor at a time; a word-level tokenizer over w0 .. w{V-1}. Nothing if it already exists."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    h, kv, d, n = fields["hidden_size"], fields["num_key_value_heads"], fields["head_dim"], fields["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (fields["vocab_size"], h)}
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (fields["num_attention_heads"] * d, h),
                p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h),
                p + "self_attn.o_proj.weight": (h, fields["num_attention_heads"] * d),
                p + "mlp.gate_proj.weight": (fields["intermediate_size"], h),
                p + "mlp.up_proj.weight": (fields["intermediate_size"], h),
                p + "mlp.down_proj.weight": (h, fields["intermediate_size"]),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not fields["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (fields["vocab_size"], h)
    gen = torch.Generator().manual_seed(seed)
    shard, size, index = {}, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(index) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.append(name)
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name], size = t, size + t.numel() * 2
    flush()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(fields["vocab_size"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(fields, indent=2))  # last: marks the folder complete
    return folder


def peak_rss_run(cmd: list[str], log: Path | None = None) -> tuple[int, float, float]:
    """Run cmd in a child process: (exit code, wall seconds, its peak RSS in GB). A fresh interpreter runs it, so
    the peak is that command's alone (RUSAGE_CHILDREN of a process with one child)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "code = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT).returncode; "
        "print(code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(log or "/dev/null"), *cmd], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]) / 1e6


def validate(folder: Path, log: Path) -> dict:
    """`edgekv validate --no-cross-check` in its own process: wall, peak RSS, and the artifact-vs-reference pair."""
    cmd = [sys.executable, "-m", "exporter.cli", "validate", str(folder), "--no-cross-check", "--json"]
    code, wall, rss = peak_rss_run(cmd, log)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    result = {"exit": code, "wall_s": round(wall, 1), "peak_rss_gb": round(rss, 2)}
    if lines:
        (pair,) = json.loads(lines[-1])["pairs"]
        result.update({k: round(pair[k], 4) for k in ("ppl_ratio", "top1_agreement", "rel_diff")})
    return result


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def rss_now() -> float:
    """This process's resident memory now, GB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024 / 1e9


def time_decode(feed, vocab: int, chunk: int, positions: list[int], tokens: int = 16) -> dict:
    """ms/token (median of `tokens` single-token `feed` calls) at each stream position, reached by feeding random
    tokens `chunk` at a time, and this process's RSS after them. The same for every runtime."""
    rng = np.random.default_rng(0)
    out, fed = {}, 0
    for pos in positions:
        while fed < pos:
            n = min(chunk, pos - fed)
            feed([int(t) for t in rng.integers(0, vocab, n)])
            fed += n
        times = []
        for i in range(tokens + 4):  # the first 4 after a prefill warm up (a runtime switching shapes)
            t = time.perf_counter()
            feed([int(rng.integers(0, vocab))])
            fed += 1
            if i >= 4:
                times.append((time.perf_counter() - t) * 1000)
        out[pos] = {"ms": round(statistics.median(times), 2), "rss_gb": round(rss_now(), 2)}
    return out


def decode_ms(folder: Path, positions: list[int]) -> dict:
    """time_decode of an artifact's runner, prefilled in its chunks."""
    from runtimes import open_artifact

    runner = open_artifact(folder)
    return time_decode(runner.feed, runner.manifest["vocab_size"], runner.manifest["chunk"], positions)


def llama_gguf(ckpt: Path, src: Path, qtype: str) -> Path:
    """The checkpoint in llama.cpp's form: `convert_hf_to_gguf.py` (f16), then `llama_model_quantize`, the library
    call behind `llama-quantize`. The converter only accepts tokenizers it recognizes, and the checkpoint's is a
    word list: the GGUF gets SmolLM2's tokenizer, padded to the vocabulary with [PAD] tokens. Token ids are all
    decode reads; the weights are the checkpoint's."""
    import llama_cpp

    out = ckpt.parent / f"{ckpt.name}-{qtype}.gguf"
    if out.is_file():
        return out
    from exporter.loaders import load_checkpoint

    staged = ckpt.parent / f"{ckpt.name}-gguf-src"
    staged.mkdir(exist_ok=True)
    for f in [*ckpt.glob("*.safetensors"), ckpt / "config.json"]:
        link = staged / f.name
        link.unlink(missing_ok=True)  # a link left by an earlier run may point nowhere
        link.symlink_to(f.resolve())  # absolute: a relative --work would resolve against staged/
    for f in load_checkpoint().tokenizer_dir.glob("tokenizer*.json"):
        shutil.copy(f, staged / f.name)
    f16 = ckpt.parent / f"{ckpt.name}-f16.gguf"
    done = subprocess.run(
        [
            sys.executable,
            str(src / "vendor/llama.cpp/convert_hf_to_gguf.py"),
            str(staged),
            "--outfile",
            str(f16),
            "--outtype",
            "f16",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"llama.cpp's convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        sys.exit(f"llama.cpp could not quantize {f16} to {qtype}")
    f16.unlink()
    return out


def llama_decode_ms(gguf: Path, positions: list[int], flash: bool, n_ctx: int = 0, threads: int = 2) -> dict:
    """time_decode of llama.cpp, fed 64 tokens at a time like edgekv's 1B exports, with flash attention on or off
    (llama.cpp's tools turn it on for a CPU, `-fa auto`; the binding leaves it off): its own f16 KV cache growing
    to the last position (n_ctx 0), or n_ctx slots with its context shift keeping the first 4 tokens, the same
    attention span as an edgekv cache of 4 + (n_ctx - 4) slots (streaming.shift_context)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx or max(positions) + 100,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=64,
        flash_attn=flash,
        verbose=False,
    )

    def feed(tokens: list[int]) -> None:
        if n_ctx:
            shift_context(llm, len(tokens), n_keep=4)
        llm.eval(tokens)

    return time_decode(feed, llm.n_vocab(), 64, positions)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        choices=SHAPES,
        default="1b",
        help="1b: Llama-3.2-1B's shape; 7b: Mistral-7B's (default: %(default)s)",
    )
    ap.add_argument("--targets", default="onnx,openvino,executorch,coreml", help="comma-separated, run one at a time")
    ap.add_argument("--schemes", default="int4,none", help="comma-separated: none (fp32; Core ML fp16), int8, int4")
    ap.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/edgekv-scale"),
        help="where the checkpoint (written once, reused) and the artifacts go (default: %(default)s)",
    )
    ap.add_argument("--window", type=int, default=124, help="the ring's W (S is 4, chunk 64; default: %(default)s)")
    ap.add_argument("--positions", default="1024,4096", help="stream positions to time decode at")
    ap.add_argument("--decode-only", action="store_true", help="reuse artifacts kept by --keep, time decode")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep each artifact (by default it is deleted once measured: a 7B sweep writes tens of GB)",
    )
    ap.add_argument(
        "--validate",
        action="store_true",
        help="also run `edgekv validate --no-cross-check` on each quantized artifact: wall, peak RSS, and "
        "its reference pair (the reference streams the checkpoint a layer at a time)",
    )
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        metavar="SRC",
        help="an unpacked llama-cpp-python source distribution (installed): time llama.cpp's decode on the "
        "same weights, converted and quantized with its own tools",
    )
    ap.add_argument(
        "--llama-types",
        default="q4_0",
        help="llama.cpp quantization types (with --llama-cpp), each timed with flash attention off and on; "
        "q4_0 is its fastest here (q4_1 took 1.8x its time at 1,024)",
    )
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    args = ap.parse_args()
    if args.llama_cpp and not (args.llama_cpp / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        sys.exit(
            f"{args.llama_cpp} is not an unpacked llama-cpp-python source distribution (no "
            "vendor/llama.cpp/convert_hf_to_gguf.py): see this script's docstring"
        )
    ckpt = write_checkpoint(args.work / f"ckpt-{args.shape}", SHAPES[args.shape])
    positions = [int(p) for p in args.positions.split(",") if p]
    rows = []
    for scheme in args.schemes.split(","):
        for target in filter(None, args.targets.split(",")):
            out = args.work / f"out-{args.shape}"
            folder = out / (target if scheme == "none" else f"{target}-{scheme}")
            row = {"shape": args.shape, "target": target, "scheme": scheme}
            if not args.decode_only:
                cmd = [
                    sys.executable,
                    "-m",
                    "exporter.cli",
                    "export",
                    "--target",
                    target,
                    "--quantize",
                    scheme,
                    "--model",
                    str(ckpt),
                    "--window",
                    str(args.window),
                    "--out",
                    str(out),
                    "--force",
                ]
                code, wall, rss = peak_rss_run(cmd, args.work / f"export-{args.shape}-{target}-{scheme}.log")
                row.update(exit=code, wall_s=round(wall, 1), peak_rss_gb=round(rss, 2))
                print(json.dumps(row), flush=True)
            if folder.is_dir():
                row["size_gb"] = round(folder_bytes(folder) / 1e9, 2)
                if target != "coreml" and positions:
                    row["decode"] = decode_ms(folder, positions)
                if args.validate and scheme != "none":
                    row["validate"] = validate(folder, args.work / f"validate-{args.shape}-{target}-{scheme}.log")
                if not args.keep:
                    shutil.rmtree(folder)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for qtype in args.llama_types.split(",") if args.llama_cpp else []:
        gguf = llama_gguf(ckpt, args.llama_cpp, qtype)
        # growing: llama.cpp's default; shifting: edgekv's span (S + W slots, S = 4 kept)
        for n_ctx, flash in [(0, False), (0, True), (4 + args.window, False), (4 + args.window, True)]:
            row = {
                "shape": args.shape,
                "target": f"llama.cpp{' -fa' if flash else ''}{f' shift {n_ctx}' if n_ctx else ''}",
                "scheme": qtype,
                "size_gb": round(gguf.stat().st_size / 1e9, 2),
                "decode": llama_decode_ms(gguf, positions, flash, n_ctx),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    # The bandwidth floor of a decode step: every weight byte read once (the cache's reads left out).
    bw = read_bandwidth()["all_threads"] if any("decode" in r for r in rows) else None
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bandwidth_gb_s": bw}, indent=2))
    print(
        f"\n| target | precision | wall | peak RSS | size | decode ms/token at {', '.join(map(str, positions))} "
        "| floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        dec = " / ".join(f"{v['ms']:.1f}" for v in r.get("decode", {}).values()) or "not run here"
        floor = f"{r['size_gb'] / bw * 1000:.1f} ms" if bw and "decode" in r else "-"
        print(
            f"| {r['target']} | {r['scheme']} | {r.get('wall_s', '-')} s | {r.get('peak_rss_gb', '-')} GB | "
            f"{r.get('size_gb', '-')} GB | {dec} | {floor} |"
        )
    if bw:
        print(f"memory read bandwidth {bw:.1f} GB/s (two threads); floor = artifact bytes / bandwidth")


if __name__ == "__main__":
    main()
