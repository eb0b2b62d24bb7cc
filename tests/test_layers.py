"""One direction between the packages: runtimes/ never imports exporter/, and the run-only subcommands
(generate, chat, ppl and bench on a folder) import neither torch nor anything of exporter/ but its CLI."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import export_tiny_chat

ROOT = Path(__file__).resolve().parents[1]
# The export stack: none of it may load when a folder is only run.
HEAVY = {
    "torch",
    "torchao",
    "executorch",
    "coremltools",
    "onnx",
    "onnxscript",
    "transformers",
    "gguf",
    "accelerate",
    "safetensors",
    "matplotlib",
}
# Runs one `edgekv` command in this process, then lists what it imported of the export stack and of exporter/.
PROBE = f"""
import json, sys
from exporter.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in {sorted(HEAVY)!r} or (m.startswith("exporter.") and m != "exporter.cli"))
print(json.dumps({{"code": code, "imported": heavy}}), file=sys.stderr)
"""


def exporter_imports(path: Path) -> list[str]:
    """Every import of exporter in a file, at any level (function bodies included), also by module-name string."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []  # relative: inside runtimes/
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if re.fullmatch(r"exporter(\.\w+)*", node.value) else []
        else:
            continue
        found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "exporter"]
    return found


def test_runtimes_never_import_exporter():
    files = sorted((ROOT / "runtimes").rglob("*.py"))
    assert len(files) > 10 and [hit for f in files for hit in exporter_imports(f)] == []


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory):
    return export_tiny_chat(tmp_path_factory.mktemp("layers"), ("onnx",))["onnx"]


def probe(*args: str, stdin: str | None = None) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=600, input=stdin, cwd=ROOT
    )
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, r.stderr[-2000:]
    return report


@pytest.mark.parametrize("command", ["generate", "chat", "ppl", "bench"])
def test_run_only_commands_import_no_export_stack(onnx_folder, tmp_path, command):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(100)))
    args = {
        "generate": ["--prompt", "w5 w17 w3", "--max-tokens", "8", "--json"],
        "chat": ["--max-tokens", "6", "--temperature", "0"],
        "ppl": ["--text", str(text), "--tokens", "20", "--json"],
        "bench": ["--tokens", "24", "--steps", "3", "--points", "2", "--json"],
    }[command]
    report = probe(command, str(onnx_folder), *args, stdin="w4 w5\nw6\n")
    assert report["imported"] == []
