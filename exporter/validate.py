"""`edgekv validate DIR`: teacher-force one real text stream, wrapping the ring at least three times,
through the artifact, the eager reference and onnxruntime running an ONNX export of the same model."""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
from pathlib import Path

import numpy as np

from runtimes.cli_ppl import DEFAULT_TEXT, read_text, read_tokens
from runtimes.errors import EdgekvError
from runtimes.manifest import load_tokenizer, read_manifest
from runtimes.progress import Bar, Progress, captured, duration

FP32_REL_TOL = 1e-3  # max |Δlogit| <= 1e-3 x the reference's largest |logit|
FP32_TOP1 = 0.995
# Core ML computes in fp16 (10-bit mantissa). Measured with the NumPy MIL executor on SmolLM2 (S=4, W=60,
# shakespeare): max |Δ| 4.2e-3 x scale over 200 tokens and 3.8e-3 over 700 (ten wraps), top-1 100% and
# 99.5% (docs/validation.md). The bound leaves ~5x headroom because Core ML's accumulation precision on the
# GPU and Neural Engine is undocumented and may be coarser than the executor's fp32 accumulation.
FP16_REL_TOL = 2e-2
FP16_TOP1 = 0.98
# Quantized weights move logits by design, so their bound is on what a user sees: perplexity of the validation
# stream at most (1 + ppl_increase) x that of the fp32 run it is compared with, and the same top-1 token at
# >= top1 of positions. Both are the project's quality goals (int8 +3 %, int4 +15 %); top-1 agreement is what
# SmolLM2 measured at a 64-slot cache with some margin (affine int4: 79-82 % on every target).
QUANT_BOUNDS = {"int8": {"ppl_increase": 0.03, "top1": 0.90}, "int4": {"ppl_increase": 0.15, "top1": 0.70}}
PRECISION_RANK = ("fp32", "fp16", "int8", "int4")  # a pair is judged by its less precise run


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="an exported edgekv folder")
    p.add_argument(
        "--tokens",
        type=int,
        help="stream length (default S + 3W + chunk: three wraps of the ring; "
        "at least three laps of a hybrid model's local ring)",
    )
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to stream (default: the shipped excerpt)")
    p.add_argument(
        "--unquantized",
        type=Path,
        metavar="DIR",
        help="for a quantized artifact: its target's unquantized export of the same model and cache to "
        "compare with (default: export one into a temporary folder)",
    )
    p.add_argument(
        "--onnx",
        type=Path,
        metavar="DIR",
        help="for an unquantized artifact: an ONNX export of the same model and cache to run in onnxruntime "
        "(default: export one into a temporary folder)",
    )
    p.add_argument(
        "--no-cross-check",
        action="store_true",
        help="skip the cross-check (onnxruntime for an unquantized artifact, the unquantized export for a "
        "quantized one) unless given with --onnx / --unquantized: exporting it needs the float model "
        "in memory, which a 1B+ model's validation may not have (skipped by itself where it would "
        "not fit)",
    )
    p.add_argument(
        "--model",
        help="the checkpoint the artifact was exported from, if it is no longer where the manifest's source.model says",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def schedule(n: int, capacity: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) calls: prefill chunks until the first wrap is crossed, then decode one by one."""
    calls, pos = [], 0
    if chunk > 1:
        while pos + chunk <= min(n, capacity + chunk):
            calls.append((pos, chunk))
            pos += chunk
    return calls + [(p, 1) for p in range(pos, n)]


def run_stream(runner, ids: list[int], calls: list[tuple[int, int]], desc: str) -> np.ndarray:
    """Logits after each call (the last token of the call), [len(calls), vocab], float32 (Gemma's 262,144-token
    vocabulary makes 1,400 rows 1.5 GB; the statistics below go through them in float64 blocks)."""
    runner.reset()
    out = None
    with Bar(calls[-1][0] + calls[-1][1], desc) as bar:
        for i, (start, n) in enumerate(calls):
            assert runner.pos == start
            logits = runner.feed(ids[start : start + n])
            if out is None:
                out = np.empty((len(calls), logits.shape[-1]), np.float32)
            out[i] = logits
            bar.update(n)
    return out


def _blocks(rows: int, size: int = 128):
    return (slice(i, i + size) for i in range(0, rows, size))


def compare(a: np.ndarray, b: np.ndarray, scale: float) -> dict:
    diff = max(float(np.abs(a[r].astype(np.float64) - b[r]).max()) for r in _blocks(len(a)))
    return {
        "max_abs_diff": diff,
        "rel_diff": diff / scale,
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    total = 0.0
    for r in _blocks(len(targets)):
        block = logits[r].astype(np.float64)
        shifted = block - block.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total += float(logp[np.arange(len(block)), targets[r]].sum())
    return math.exp(-total / len(targets))


def main(args: argparse.Namespace) -> int:
    with captured():  # the converters' and runtimes' chatter; edgekv's own lines and bars still show
        result = measure(args)
    report(args, result)
    return 0 if result["ok"] else 1


def measure(args: argparse.Namespace) -> dict:
    log = Progress("validate")
    log(f"checking {args.artifact}")  # within a second: loading torch and the model comes next
    text = read_text(args.text)
    manifest = read_manifest(args.artifact)
    target, sink, window, chunk = manifest["target"], manifest["sink"], manifest["window"], manifest["chunk"]
    # Three wraps of the ring, and three laps of a hybrid model's local ring.
    n = args.tokens or max(sink + 3 * window, 3 * (manifest.get("local") or {}).get("window", 0)) + chunk
    log(
        f"{target} artifact, S={sink} W={window}: {n} tokens through it, the eager reference and a cross-check; "
        f"loading {args.model or manifest['source']['model']}"
    )
    calls = schedule(n, sink + window, chunk)
    if target == "coreml":
        seconds = executor_seconds(args.artifact, manifest, calls)
        log(
            f"the NumPy MIL executor runs the package: {sum(k > 1 for _, k in calls)} prefill and "
            f"{sum(k == 1 for _, k in calls)} decode calls, about {duration(seconds)} on a 2-core machine "
            "(then the cross-check and the reference, each shorter)"
        )

    from exporter.config import physical_memory
    from exporter.loaders import build_model, load_checkpoint
    from exporter.reference import streamed_logits
    from runtimes import open_artifact

    scheme = manifest.get("quantization", {}).get("scheme", "none")
    if args.onnx and scheme != "none":
        raise EdgekvError("--onnx is for unquantized artifacts; compare a quantized one with --unquantized DIR")
    if args.unquantized and scheme == "none":
        raise EdgekvError(f"{args.artifact} is not quantized; --unquantized is for quantized artifacts")
    # The cross-check: an fp32 artifact against onnxruntime running the same model; a quantized one against its
    # own target's unquantized export, so that pair measures quantization alone. Given, or exported below.
    check, given, flag = (
        ("onnx", args.onnx, "--onnx") if scheme == "none" else (target, args.unquantized, "--unquantized")
    )
    if given:
        matching_export(given, manifest, check, flag)
    try:
        ckpt = load_checkpoint(args.model or manifest["source"]["model"])
    except EdgekvError as e:
        if args.model:
            raise
        raise EdgekvError(f"{e} (the model {args.artifact} was exported from; pass --model if it moved)") from None
    if ckpt.weights_hash() != manifest["source"]["weights_sha256"]:
        raise EdgekvError(
            f"{ckpt.source} has other weights than {args.artifact} was exported from; "
            "pass that model with --model, or re-export"
        )
    ids = read_tokens(load_tokenizer(ckpt.tokenizer_dir), text, n, args.text)
    if len(ids) < n:
        raise EdgekvError(f"{args.text} has only {len(ids)} tokens; need {n} (pass a longer --text)")
    ends = np.array([s + k - 1 for s, k in calls])
    unquantized = "fp16" if manifest.get("compute_precision") == "float16" else "fp32"
    own, suffix = (unquantized, "") if scheme == "none" else (scheme, f"-{scheme}")
    not_run, runners = [], {}  # name -> (precision, a function making the runner)
    if target == "coreml":  # the NumPy MIL executor everywhere, and Core ML itself where it exists
        check_coreml_spec(args.artifact, manifest)
        runners[f"coreml-numpy{suffix}"] = (own, lambda: mil_runner(args.artifact))
        if platform.system() == "Darwin":
            runners[f"coreml{suffix}"] = (own, lambda: open_artifact(args.artifact))
        else:
            not_run.append("coreml: Core ML prediction needs macOS; the NumPy MIL executor ran the package instead")
    else:
        runners["onnxruntime" if target == "onnx" and scheme == "none" else f"{target}{suffix}"] = (
            own,
            lambda: open_artifact(args.artifact),
        )
    cross = (
        None
        if "onnxruntime" in runners
        else ("onnxruntime" if scheme == "none" else "coreml-numpy" if target == "coreml" else target)
    )
    if cross and not given:
        fp32_bytes = float_bytes(ckpt.config)
        if args.no_cross_check or 2 * fp32_bytes > physical_memory():
            why = (
                "--no-cross-check"
                if args.no_cross_check
                else (f"its export needs the float model in memory ({fp32_bytes / 1e9:.1f} GB fp32)")
            )
            not_run.append(f"{cross}: the {check} export to compare with was not made ({why}); pass {flag} DIR")
            cross = None
    logits = {}
    with tempfile.TemporaryDirectory() as tmp:
        from exporter.export import export_one, manifest_base

        if cross:
            if not given:
                log(f"exporting the {check} model to compare with")
            folder = given or export_one(
                build_model(ckpt, sink, window, max_chunk=chunk, last_logits_only=True),
                ckpt,
                check,
                Path(tmp) / check,
                manifest_base(ckpt, sink, window, chunk),
                chunk,
            )
            runners[cross] = (
                "fp16" if cross == "coreml-numpy" else "fp32",
                lambda: mil_runner(folder) if cross == "coreml-numpy" else open_artifact(folder),
            )
        for name, (_, make) in runners.items():  # one runner in memory at a time
            logits[name] = run_stream(make(), ids, calls, name)
    # The reference last, a layer at a time, once the runners are gone.
    runs = {"reference": "fp32", **{name: precision for name, (precision, _) in runners.items()}}
    with Bar(ckpt.config.num_layers, "reference, a layer at a time", "layer") as bar:
        logits = {
            "reference": streamed_logits(ckpt, sink, window, ids[:n], list(ends), lambda: bar.update(1)),
            **logits,
        }

    scale = float(max(logits["reference"].max(), -logits["reference"].min()))
    targets_next = np.array([ids[e + 1] if e + 1 < len(ids) else ids[e] for e in ends])[:-1]
    ppl = {k: perplexity(v[:-1], targets_next) for k, v in logits.items()}
    names = list(logits)
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = {"a": a, "b": b, **compare(logits[a], logits[b], scale)}
            precision = max(runs[a], runs[b], key=PRECISION_RANK.index)
            p["tolerance"] = tolerance(precision, scale)
            if precision in QUANT_BOUNDS:  # one side is quantized: perplexity against the other side
                quantized, other = (a, b) if runs[a] == precision else (b, a)
                p["ppl_ratio"] = ppl[quantized] / ppl[other]
                p["ok"] = p["ppl_ratio"] <= p["tolerance"]["ppl_ratio"] and (
                    p["top1_agreement"] >= p["tolerance"]["top1_agreement"]
                )
            else:
                p["ok"] = p["max_abs_diff"] <= p["tolerance"]["max_abs_diff"] and (
                    p["top1_agreement"] >= p["tolerance"]["top1_agreement"]
                )
            pairs.append(p)
    ok = all(p["ok"] for p in pairs)
    return {
        "target": target,
        "quantization": scheme,
        "tokens": n,
        "compared_positions": len(ends),
        "logit_scale": scale,
        "pairs": pairs,
        "perplexity": ppl,
        "not_run": not_run,
        "ok": ok,
        "sink": sink,
        "window": window,
        "chunk": chunk,
    }


def report(args: argparse.Namespace, result: dict) -> None:
    pairs, ppl, not_run, ok = result["pairs"], result["perplexity"], result["not_run"], result["ok"]
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.artifact} ({result['target']}, S={result['sink']} W={result['window']} "
            f"chunk={result['chunk']}): {result['tokens']} tokens, {result['compared_positions']} positions "
            f"compared, logit scale {result['logit_scale']:.2f}"
        )
        for p in pairs:
            tol = p["tolerance"]
            limit = f"ppl x{tol['ppl_ratio']:g}" if "ppl_ratio" in tol else f"{tol['max_abs_diff']:.2e}"
            ratio = f"  ppl x{p['ppl_ratio']:.4f}" if "ppl_ratio" in p else ""
            print(
                f"  {p['a']:>16} vs {p['b']:<16} max|Δ| {p['max_abs_diff']:.2e} ({p['rel_diff']:.1e} of scale)"
                f"  top-1 {100 * p['top1_agreement']:.2f}%{ratio}  {'ok' if p['ok'] else 'FAIL'} (limits "
                f"{limit}, {100 * tol['top1_agreement']:g}%)"
            )
        print("  perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        for line in not_run:
            print(f"  not run: {line}")
        print(f"  {'PASS' if ok else 'FAIL'}")


def matching_export(folder: Path, manifest: dict, target: str, flag: str) -> Path:
    """The export given by `flag`, checked to be an unquantized `target` export of the same weights and cache."""
    twin = read_manifest(folder)
    same = ("sink", "window", "chunk")
    if (
        twin["target"] != target
        or any(twin[k] != manifest[k] for k in same)
        or twin["source"]["weights_sha256"] != manifest["source"]["weights_sha256"]
    ):
        raise EdgekvError(
            f"{folder} is not a {target} export of the same model and cache as the artifact; "
            f"pass a matching one or leave out {flag}"
        )
    if twin.get("quantization", {}).get("scheme", "none") != "none":
        raise EdgekvError(f"{folder} is quantized; {flag} takes an export made without --quantize")
    return folder


def float_bytes(cfg) -> int:
    """Bytes of the model's weights in fp32 (shapes only: built on the meta device)."""
    import torch

    from exporter.model import StreamingLM

    with torch.device("meta"):
        model = StreamingLM(cfg, 1, 1, 1)
    return 4 * sum(p.numel() for p in model.parameters())


# The NumPy MIL executor's cost, measured on a 2-core machine with SmolLM2-135M fp16 at 4 + 1,020 slots
# (docs/benchmarks.md): a decode step reads every weight (held as float32 after loading) and the whole cache,
# 63.5 ms for 258 MB of fp16 weights and a 24 MB cache; a prefill step's attention grows with the chunk times the
# cache, 2.8 s for 64 tokens. Loading dequantizes the weights once (11 s).
DECODE_S_PER_MB = 0.0635 / 282
PREFILL_S_PER_TOKEN_MB = 2.8 / (64 * 24)
LOAD_S_PER_MB = 11 / 258


def executor_seconds(folder: Path, manifest: dict, calls: list[tuple[int, int]]) -> float:
    """What the NumPy MIL executor will take for these calls, from the package's size alone (no loading)."""
    weights = sum(f.stat().st_size for f in (folder / manifest["files"]["model"]).rglob("*.bin")) / 1e6
    # dequantized at load: a step reads fp16-sized weights (as float32) whatever the package stores
    weights *= 16 / {"int8": 8, "int4": 4}.get(manifest.get("quantization", {}).get("scheme"), 16)
    cache = sum(np.prod(s["shape"]) * 2 for s in manifest["state"]) / 1e6
    decode = sum(k == 1 for _, k in calls) * DECODE_S_PER_MB * (weights + cache)
    prefill = sum(k > 1 for _, k in calls) * PREFILL_S_PER_TOKEN_MB * manifest["chunk"] * cache
    return LOAD_S_PER_MB * weights + decode + prefill


def mil_runner(folder: Path):
    from runtimes.coreml_runner import MILRunner

    return MILRunner(folder, read_manifest(folder))


def tolerance(precision: str, scale: float) -> dict:
    """The bound for a pair whose less precise run has `precision`."""
    if precision in QUANT_BOUNDS:
        bound = QUANT_BOUNDS[precision]
        return {"ppl_ratio": 1 + bound["ppl_increase"], "top1_agreement": bound["top1"]}
    rel, top1 = (FP16_REL_TOL, FP16_TOP1) if precision == "fp16" else (FP32_REL_TOL, FP32_TOP1)
    return {"max_abs_diff": rel * scale, "top1_agreement": top1}


def check_coreml_spec(folder: Path, manifest: dict) -> None:
    """What Linux can check of a Core ML package: functions, inputs, fp16 state, iOS 18 spec."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(folder / manifest["files"]["model"]))
    functions = {f.name: f for f in spec.description.functions}
    if spec.specificationVersion < 9 or set(functions) != {"decode", "prefill"}:
        raise EdgekvError(f"{folder}: not an iOS 18 multifunction package with decode and prefill")
    for f in functions.values():
        states = [(s.name, s.type.stateType.arrayType.dataType) for s in f.state]
        if states != [("kv_cache", ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16)]:
            raise EdgekvError(f"{folder}: function {f.name} lacks the fp16 kv_cache state")
