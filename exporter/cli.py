"""The `edgekv` command: one module per subcommand, each with configure_parser() and main()."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from exporter.config import EdgekvError

COMMANDS = {
    "export": ("exporter.export", "export the model with its sink + ring cache to a target format"),
    "validate": ("exporter.validate", "compare an artifact with the reference and onnxruntime"),
    "ppl": ("exporter.ppl", "perplexity of a text streamed through the cache"),
    "generate": ("exporter.generate", "stream a continuation of a prompt from an artifact"),
    "chat": ("exporter.chat", "multi-turn chat through one continuous stream"),
    "bench": ("exporter.bench", "decode speed and memory against stream position, prefill speed, size"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, naming the fix, instead of argparse's usage dump."""
        self.exit(2, f"edgekv: error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="edgekv", description="Streaming (sink + ring) KV-cache LLM export.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module)
        modules[name].configure_parser(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].main(args)
    except EdgekvError as e:
        if os.environ.get("EDGEKV_DEBUG"):
            raise
        print(f"edgekv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgekv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
