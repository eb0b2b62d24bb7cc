"""`edgekv validate DIR`: teacher-force one real text stream, wrapping the ring at least three times,
through the artifact, the eager reference and onnxruntime running an ONNX export of the same model."""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from exporter.config import EdgekvError
from exporter.manifest import read_manifest

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "shakespeare-excerpt.txt"
FP32_REL_TOL = 1e-3  # max |Δlogit| <= 1e-3 x the reference's largest |logit|
FP32_TOP1 = 0.995
# Core ML computes in fp16 (10-bit mantissa). Measured with the NumPy MIL executor on SmolLM2 (S=4, W=60,
# shakespeare): max |Δ| 3.6e-3 x scale over 200 tokens and 5.5e-3 over 700 (ten wraps), top-1 100% and
# 99.7%; tiny configs 1e-3. The bound leaves ~4x headroom because Core ML's accumulation precision on the
# GPU and Neural Engine is undocumented and may be coarser than the executor's fp32 accumulation.
FP16_REL_TOL = 2e-2
FP16_TOP1 = 0.98
FP32_RUNS = {"reference", "onnxruntime"}  # the comparison runs; artifact runs are named after their target


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", type=Path, help="an exported edgekv folder")
    p.add_argument("--tokens", type=int, help="stream length (default S + 3W + chunk: three wraps of the ring)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text to stream (default: the shipped excerpt)")
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
    """Logits after each call (the last token of the call), [len(calls), vocab]."""
    runner.reset()
    out = []
    for start, n in tqdm(calls, desc=desc, file=sys.stderr, disable=None, leave=False):
        assert runner.pos == start
        out.append(runner.feed(ids[start:start + n]))
    return np.stack(out).astype(np.float64)


def compare(a: np.ndarray, b: np.ndarray, scale: float) -> dict:
    diff = float(np.abs(a - b).max())
    return {"max_abs_diff": diff, "rel_diff": diff / scale,
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return math.exp(-float(logp[np.arange(len(targets)), targets].mean()))


def main(args: argparse.Namespace) -> int:
    from exporter.loaders import build_model, load_checkpoint, load_tokenizer
    from exporter.ppl import read_tokens
    from runtimes import open_artifact
    from runtimes.reference_runner import ReferenceRunner

    manifest = read_manifest(args.artifact)
    target, sink, window, chunk = manifest["target"], manifest["sink"], manifest["window"], manifest["chunk"]
    n = args.tokens or sink + 3 * window + chunk
    ckpt = load_checkpoint(manifest["source"]["model"])
    if ckpt.weights_hash() != manifest["source"]["weights_sha256"]:
        raise EdgekvError(f"{ckpt.source} changed since {args.artifact} was exported; re-export it")
    ids = read_tokens(load_tokenizer(ckpt.tokenizer_dir), args.text, n)
    if len(ids) < n:
        raise EdgekvError(f"{args.text} has only {len(ids)} tokens; need {n} (pass a longer --text)")
    calls = schedule(n, sink + window, chunk)
    ends = np.array([s + k - 1 for s, k in calls])
    model = build_model(ckpt, sink, window, max_chunk=chunk, last_logits_only=True)

    logits = {"reference": run_stream(ReferenceRunner(model, None), ids, calls, "reference")}
    not_run = []
    if target == "coreml":  # the NumPy MIL executor everywhere, and Core ML itself where it exists
        from runtimes.coreml_runner import MILRunner

        check_coreml_spec(args.artifact, manifest)
        logits["coreml-numpy"] = run_stream(MILRunner(args.artifact, manifest), ids, calls, "coreml-numpy")
        if platform.system() == "Darwin":
            logits["coreml"] = run_stream(open_artifact(args.artifact), ids, calls, "coreml")
        else:
            not_run.append("coreml: Core ML prediction needs macOS; the NumPy MIL executor ran the package instead")
    else:
        logits[target] = run_stream(open_artifact(args.artifact), ids, calls, target)
    if target != "onnx":
        from exporter.export import export_one, manifest_base

        with tempfile.TemporaryDirectory() as tmp:
            base = manifest_base(ckpt, sink, window, chunk)
            folder = export_one(model, ckpt, "onnx", Path(tmp) / "onnx", base, chunk)
            logits["onnxruntime"] = run_stream(open_artifact(folder), ids, calls, "onnxruntime")
    else:
        logits["onnxruntime"] = logits.pop("onnx")

    scale = float(np.abs(logits["reference"]).max())
    fp16 = manifest.get("compute_precision") == "float16"
    names = list(logits)
    pairs = [{"a": a, "b": b, **compare(logits[a], logits[b], scale)}
             for i, a in enumerate(names) for b in names[i + 1:]]
    targets_next = np.array([ids[e + 1] if e + 1 < len(ids) else ids[e] for e in ends])[:-1]
    ppl = {k: perplexity(v[:-1], targets_next) for k, v in logits.items()}
    for p in pairs:  # the fp16 bound applies to pairs that include the fp16 artifact itself
        rel_tol, top1_tol = (FP16_REL_TOL, FP16_TOP1) if fp16 and not {p["a"], p["b"]} <= FP32_RUNS else (
            FP32_REL_TOL, FP32_TOP1)
        p["ok"] = p["rel_diff"] <= rel_tol and p["top1_agreement"] >= top1_tol
        p["tolerance"] = {"max_abs_diff": rel_tol * scale, "top1_agreement": top1_tol}
    ok = all(p["ok"] for p in pairs)
    result = {"target": target, "tokens": n, "compared_positions": len(ends), "logit_scale": scale,
              "pairs": pairs, "perplexity": ppl, "not_run": not_run, "ok": ok}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.artifact} ({target}, S={sink} W={window} chunk={chunk}): {n} tokens, "
              f"{len(ends)} positions compared, logit scale {scale:.2f}")
        for p in pairs:
            tol = p["tolerance"]
            print(f"  {p['a']:>12} vs {p['b']:<12} max|Δ| {p['max_abs_diff']:.2e} ({p['rel_diff']:.1e} of scale)"
                  f"  top-1 {100 * p['top1_agreement']:.2f}%  {'ok' if p['ok'] else 'FAIL'} (limits "
                  f"{tol['max_abs_diff']:.2e}, {100 * tol['top1_agreement']:g}%)")
        print("  perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        for line in not_run:
            print(f"  not run: {line}")
        print(f"  {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


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
