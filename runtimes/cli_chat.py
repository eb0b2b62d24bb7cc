"""`edgekv chat DIR`: multi-turn chat with the model's chat template, one continuous stream through the
fixed cache, so a conversation can go on for hours in constant memory. One line of input per turn."""

from __future__ import annotations

import argparse
import sys
import time

from runtimes.cli_generate import add_sampling_args, check_sampling_args
from runtimes.errors import EdgekvError


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p, temperature=0.7, top_p=0.9)
    p.add_argument("--system", help="system prompt (default: the template's own, if any)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default 512)")


def read_turns(interactive: bool):
    """User lines: prompted on a terminal, one per line from a pipe; ends at EOF."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


def main(args: argparse.Namespace) -> int:
    from runtimes import open_artifact
    from runtimes.chat import Chat, ChatTemplate

    sampling = check_sampling_args(args)
    if args.max_tokens <= 0:
        raise EdgekvError("--max-tokens must be > 0 for chat")
    runner = open_artifact(args.artifact)
    chat = Chat(runner, ChatTemplate(args.artifact), system=args.system, **sampling)
    m = runner.manifest
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edgekv chat: {m['source']['model']} ({m['target']}, cache {m['sink']}+{m['window']} slots). "
              "Ctrl-D or Ctrl-C to quit.", file=sys.stderr)
    try:
        for user in read_turns(interactive):
            first = None
            for piece in chat.reply(user, args.max_tokens):
                first = first or time.perf_counter()
                print(piece, end="", flush=True)
            seconds = time.perf_counter() - (first or time.perf_counter())
            print()
            n = len(chat.last_tokens)
            rate = f"{(n - 1) / seconds:.1f} tok/s" if n > 1 and seconds > 0 else "-"
            print(f"[{n} tokens, {rate} after a {chat.last_prompt}-token turn prompt; stream position "
                  f"{runner.pos}, cache {m['sink']}+{m['window']} slots]", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0
