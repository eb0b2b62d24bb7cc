"""`edgekv generate DIR --prompt P`: stream a continuation from an artifact, for as long as asked."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from runtimes.errors import EdgekvError


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    p.add_argument(
        "artifact",
        type=Path,
        help="an exported edgekv folder (coreml runs as Core ML on macOS and through the NumPy MIL executor elsewhere)",
    )
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")


def check_sampling_args(args: argparse.Namespace) -> dict:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise EdgekvError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p, temperature=0.0, top_p=1.0)
    p.add_argument("--prompt", required=True, help="text to continue (goes through the chunk entry)")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="tokens to generate; 0 = no limit, run until Ctrl-C (default 256)"
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the model's end token")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object at the end (token ids, text, speeds) instead of streaming",
    )
    add_session_arg(p)


def add_session_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--session",
        type=Path,
        metavar="FILE",
        help="resume the stream saved in FILE if it exists, and save it there (safetensors) at the end",
    )


def open_session(runner, path: Path | None) -> dict | None:
    """The state saved in `path` with the runner resumed from it; None when there is no file yet (or no --session)."""
    if path is None or not path.exists():
        return None
    from runtimes.progress import say
    from runtimes.session import load_session

    state = load_session(runner, path)
    say(f"edgekv: resumed {path} at stream position {runner.pos}")
    return state


def main(args: argparse.Namespace) -> int:
    from runtimes import open_artifact
    from runtimes.generate import TextStream, generate

    sampling = check_sampling_args(args)
    if args.max_tokens < 0 or (args.json and args.max_tokens == 0):
        raise EdgekvError("--max-tokens must be >= 0 (and > 0 with --json)")
    runner = open_artifact(args.artifact)
    state = open_session(runner, args.session)
    # A resumed stream continues: no BOS again, and first the token sampled last time but never fed.
    prompt = (state or {}).get("pending", []) + runner.tokenizer.encode(
        args.prompt, add_special_tokens=state is None
    ).ids
    if not prompt:
        raise EdgekvError("--prompt is empty (it may be empty only to continue a saved --session)")
    eos = runner.manifest["special_tokens"]["eos"]
    stop = None if args.ignore_eos or eos is None else {eos}
    stream, tokens, text = TextStream(runner.tokenizer), [], []
    start = time.perf_counter()
    first = None
    try:
        for token in generate(runner, prompt, args.max_tokens, stop=stop, **sampling):
            first = first or time.perf_counter()
            tokens.append(token)
            piece = "" if stop and token in stop else stream.push(token)
            if args.json:
                text.append(piece)
            else:
                print(piece, end="", flush=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an unlimited stream ends: report what was produced
    end = time.perf_counter()
    if args.session:
        from runtimes.session import save_session

        save_session(runner, args.session, {"pending": tokens[-1:]})
    stats = speeds(len(prompt), runner.pos - len(prompt), start, first, end)
    if args.json:
        print(
            json.dumps(
                {"prompt_tokens": prompt, "tokens": tokens, "text": "".join(text), "position": runner.pos, **stats}
            )
        )
    else:
        print()
        print(
            f"[prompt {len(prompt)} tokens at {stats['prefill_tok_s']:.1f} tok/s, generated {len(tokens)} at "
            f"{stats['decode_tok_s']:.1f} tok/s, stream position {runner.pos}, cache "
            f"{runner.manifest['sink']}+{runner.manifest['window']} slots]",
            file=sys.stderr,
        )
    return 0


def speeds(n_prompt: int, n_decoded: int, start: float, first: float | None, end: float) -> dict:
    """Prompt tokens/s up to the first new token; decode tokens/s over the one-token calls after it."""
    first = first or end
    return {
        "prefill_tok_s": n_prompt / max(first - start, 1e-9),
        "decode_tok_s": n_decoded / (end - first) if n_decoded > 0 and end > first else 0.0,
    }
