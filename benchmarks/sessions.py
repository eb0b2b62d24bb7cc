"""Sessions and pinned system prompts, measured: time to first token of a chat that starts from the artifact's
prefix.safetensors against one that prefills the same system prompt, and the size and save/load time of a session
with a full ring.

    python benchmarks/sessions.py --out out/sessions [--target onnx] [--model M] [--runs 5]

Exports the model twice (plain, and with --system-prompt benchmarks/system-prompt.txt) unless the folders exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runtimes import open_artifact
from runtimes.chat import Chat, ChatTemplate
from runtimes.session import load_session, save_session

HERE = Path(__file__).resolve().parent
USER = "Hello! Are you open on Sunday afternoon?"


def export(out: Path, target: str, model: str | None, *extra: str) -> Path:
    if not (out / target).exists():
        cmd = [sys.executable, "-m", "exporter.cli", "export", "--target", target, "--out", str(out), *extra]
        subprocess.run(cmd + (["--model", model] if model else []), check=True)
    return out / target


def first_token_seconds(folder: Path, system: str | None) -> float:
    """Open the artifact, start the chat (from the prefix when the folder has one), time the first reply token."""
    runner = open_artifact(folder)
    chat = Chat(runner, ChatTemplate(folder), system=system, temperature=0.0)
    start = time.perf_counter()
    if "prefix" in runner.manifest:
        state = load_session(runner, folder / runner.manifest["prefix"]["file"])
        chat.messages, chat.in_stream = state["messages"], state["in_stream"]
    next(iter(chat.reply(USER, 1)), None)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/sessions"))
    ap.add_argument("--target", default="onnx")
    ap.add_argument("--model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    system = (HERE / "system-prompt.txt").read_text().strip()
    plain = export(args.out / "plain", args.target, args.model)
    pinned = export(args.out / "pinned", args.target, args.model, "--system-prompt", str(HERE / "system-prompt.txt"))
    prefix_tokens = json.loads((pinned / "edgekv.json").read_text())["prefix"]["tokens"]
    ttft = {"prefill": [], "prefix": []}
    for _ in range(args.runs):  # alternated, so drift on a shared machine hits both alike
        ttft["prefill"].append(first_token_seconds(plain, system))
        ttft["prefix"].append(first_token_seconds(pinned, None))
    runner = open_artifact(plain)
    runner.feed(list(range(10, 10 + runner.manifest["sink"] + runner.manifest["window"] + 100)))  # past one wrap
    start = time.perf_counter()
    size = save_session(runner, args.out / "full.safetensors")
    saved = time.perf_counter() - start
    fresh = open_artifact(plain)
    start = time.perf_counter()
    load_session(fresh, args.out / "full.safetensors")
    loaded = time.perf_counter() - start
    m = runner.manifest
    result = {
        "target": args.target,
        "model": m["source"]["model"],
        "prefix_tokens": prefix_tokens,
        "ttft_prefill_s": statistics.median(ttft["prefill"]),
        "ttft_prefix_s": statistics.median(ttft["prefix"]),
        "runs": args.runs,
        "session_bytes_full_ring": size,
        "save_s": saved,
        "load_s": loaded,
        "cache": f"{m['sink']}+{m['window']}",
        "prefix_bytes": (pinned / "prefix.safetensors").stat().st_size,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
