"""`edgekv chat DIR`: multi-turn chat with the model's chat template, one continuous stream through the
fixed cache, so a conversation can go on for hours in constant memory. One line of input per turn."""

from __future__ import annotations

import argparse
import sys
import time

from runtimes.cli_generate import add_sampling_args, add_session_arg, check_sampling_args, open_session
from runtimes.errors import EdgekvError


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p, temperature=0.7, top_p=0.9)
    p.add_argument("--system", help="system prompt (default: the template's own, if any)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default 512)")
    add_session_arg(p)
    p.epilog = (
        "With --session the conversation is saved after every reply (atomically: a crash keeps the last "
        "reply's session) and on /save; a later `edgekv chat DIR --session FILE` resumes it."
    )


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
    state = open_session(runner, args.session)
    if state is None and "prefix" in runner.manifest:  # the pinned system prompt: its cache, no prefill
        from runtimes.session import load_session

        state = load_session(runner, runner.folder / runner.manifest["prefix"]["file"])
        print(
            f"edgekv: started from the pinned system prompt ({runner.pos} tokens in the sink, no prefill)",
            file=sys.stderr,
        )
    if state is not None:
        chat.messages, chat.in_stream = state.get("messages", []), state.get("in_stream", "")
        if args.system:
            print("edgekv: note: --system is ignored: the conversation already has its system prompt", file=sys.stderr)

    def save():
        if args.session:
            from runtimes.session import save_session

            save_session(runner, args.session, {"messages": chat.messages, "in_stream": chat.in_stream})

    m = runner.manifest
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"edgekv chat: {m['source']['model']} ({m['target']}, cache {m['sink']}+{m['window']} slots). "
            "Ctrl-D or Ctrl-C to quit.",
            file=sys.stderr,
        )
    try:
        for user in read_turns(interactive):
            if user == "/save":
                save()
                print(f"[saved {args.session}]" if args.session else "[no --session to save to]", file=sys.stderr)
                continue
            first = None
            for piece in chat.reply(user, args.max_tokens):
                first = first or time.perf_counter()
                print(piece, end="", flush=True)
            seconds = time.perf_counter() - (first or time.perf_counter())
            print()
            n = len(chat.last_tokens)
            rate = f"{(n - 1) / seconds:.1f} tok/s" if n > 1 and seconds > 0 else "-"
            save()  # before the turn's last line: once it shows, the turn is on disk
            print(
                f"[{n} tokens, {rate} after a {chat.last_prompt}-token turn prompt; stream position "
                f"{runner.pos}, cache {m['sink']}+{m['window']} slots]",
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0
