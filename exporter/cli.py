"""The `edgekv` command: one module per subcommand, each with configure_parser() and main().

Only the chosen subcommand's module is imported: the run-only ones live in runtimes/ and need no torch, so
`edgekv generate DIR` works where only a runtime is installed; export and validate need the export stack.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from contextlib import contextmanager

from runtimes.errors import EdgekvError
from runtimes.manifest import edgekv_version
from runtimes.stopping import Stopped, exit_code, private_tmp, stop_signals

COMMANDS = {
    "export": ("exporter.export", "export the model with its sink + ring cache to a target format"),
    "validate": ("exporter.validate", "compare an artifact with the reference and onnxruntime"),
    "ppl": ("runtimes.cli_ppl", "perplexity of a text streamed through the cache"),
    "generate": ("runtimes.cli_generate", "stream a continuation of a prompt from an artifact"),
    "chat": ("runtimes.cli_chat", "multi-turn chat through one continuous stream"),
    "bench": ("runtimes.cli_bench", "decode speed and memory against stream position, prefill speed, size"),
}
EAGER_PPL = "exporter.ppl"  # `edgekv ppl` without a folder runs the eager model


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, naming the fix, instead of argparse's usage dump."""
        self.exit(2, f"edgekv: error: {message} (see `{self.prog} --help`)\n")


@contextmanager
def export_stack(module: str, command: str):
    """In an exporter/ module a missing package is the export stack not being installed: said in one line."""
    try:
        yield
    except ModuleNotFoundError as e:
        if not module.startswith("exporter.") or (e.name or "").split(".")[0] in ("exporter", "runtimes"):
            raise
        raise EdgekvError(
            f"`edgekv {command}` needs the export stack ({e.name} is not installed); pip install 'edgekv[export]'"
        ) from None


def run(argv: list[str]) -> int:
    parser = Parser(prog="edgekv", description="Streaming (sink + ring) KV-cache LLM export.")
    parser.add_argument("--version", action="version", version=f"edgekv {edgekv_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    # The top-level parser has no options but --help, so the first other word names the subcommand.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        with export_stack(COMMANDS[name][0], name):
            importlib.import_module(COMMANDS[name][0]).configure_parser(parsers[name])
    args = parser.parse_args(argv)  # exits unless a subcommand was named
    module = EAGER_PPL if args.command == "ppl" and args.artifact is None else COMMANDS[args.command][0]
    with export_stack(module, args.command):
        return importlib.import_module(module).main(args)


def main(argv: list[str] | None = None) -> int:
    try:
        with stop_signals(), private_tmp():
            return run(sys.argv[1:] if argv is None else argv)
    except EdgekvError as e:
        if os.environ.get("EDGEKV_DEBUG"):
            raise
        print(f"edgekv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM / SIGHUP (runtimes/stopping.py): cleaned up on the way
        print(f"edgekv: {'stopped by ' + str(stop) if isinstance(stop, Stopped) else 'interrupted'}", file=sys.stderr)
        return exit_code(stop)


if __name__ == "__main__":
    sys.exit(main())
