"""The deployed path: a fresh venv with the base install and the ONNX and OpenVINO runtimes, no torch, runs
`edgekv generate` and `edgekv chat` on artifacts this venv exported, token for token as here; with the Core ML
extra added, the NumPy MIL executor runs a Core ML package there too."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import edgekv, export_tiny_chat, one_line_error

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a fresh venv from the package index: ~1.5 min, kept out of the default tier's 15
PROMPT = "w5 w17 w3 w99 w42 w8 w64"
TURNS = "w4 w5 w6\nw7 w8\n"  # two chat turns over stdin


def du_mb(path: Path) -> int:
    return int(subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def pip_install(venv: Path, src: Path, extras: str) -> None:
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{src}[{extras}]"], capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stderr[-3000:]


def torch_is_missing(venv: Path) -> bool:
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    return r.returncode != 0 and "No module named 'torch'" in r.stderr


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """(venv, source copy): `pip install '.[onnx,openvino]'`, not editable, from a copy of what a wheel is built
    from (pip builds beside the sources). The venv's size is recorded before any test adds to it."""
    tmp = tmp_path_factory.mktemp("deploy")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "exporter", "runtimes"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    venv = tmp / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip_install(venv, src, "onnx,openvino")
    return venv, src, du_mb(venv)


def device_edgekv(venv: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "edgekv"), *args], capture_output=True, text=True, timeout=600, input=stdin, cwd=venv.parent
    )  # not the repo: its sources must not shadow the install


def generate_json(run, folder: Path) -> dict:
    r = run("generate", str(folder), "--prompt", PROMPT, "--max-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def chat(run, folder: Path) -> str:
    r = run("chat", str(folder), "--max-tokens", "8", "--temperature", "0", stdin=TURNS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len([ln for ln in r.stderr.splitlines() if "stream position" in ln]) == 2, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return export_tiny_chat(tmp_path_factory.mktemp("deploy-art"), ("onnx", "openvino"))


def test_torch_free_venv_generates_and_chats_as_the_export_venv(device, folders, record_property):
    venv, _, size = device
    assert torch_is_missing(venv)
    record_property(
        "measured",
        f"torch-free venv (pip install '.[onnx,openvino]') {size} MB; "
        f"full venv ('.[export,dev]') {du_mb(Path(sys.prefix))} MB",
    )

    def here(*args, stdin=None):
        return edgekv(*args, stdin=stdin)

    def there(*args, stdin=None):
        return device_edgekv(venv, *args, stdin=stdin)

    for target, folder in folders.items():
        want, got = generate_json(here, folder), generate_json(there, folder)
        assert len(set(want["tokens"])) > 3, target  # a real continuation
        for key in ("prompt_tokens", "tokens", "text", "position"):
            assert got[key] == want[key], (target, key)
        want_chat = chat(here, folder)
        assert len(want_chat.splitlines()) == 2 and chat(there, folder) == want_chat, target


def test_a_missing_runtime_or_export_stack_names_its_extra(device, folders, tmp_path):
    venv = device[0]
    folder = tmp_path / "et"
    shutil.copytree(folders["onnx"], folder)
    manifest = json.loads((folder / "edgekv.json").read_text())
    (folder / "edgekv.json").write_text(json.dumps({**manifest, "target": "executorch"}))
    one_line_error(
        device_edgekv(venv, "generate", str(folder), "--prompt", "w1"),
        "executorch is not installed; pip install 'edgekv[executorch]'",
    )
    one_line_error(device_edgekv(venv, "export", "--target", "onnx"), "pip install 'edgekv[export]'")
    one_line_error(device_edgekv(venv, "ppl", "--text", str(tmp_path)), "pip install 'edgekv[export]'")
    one_line_error(
        device_edgekv(
            venv, "bench", str(folders["onnx"]), "--tokens", "24", "--steps", "3", "--plot", str(tmp_path / "b.png")
        ),
        "matplotlib is not installed; pip install 'edgekv[plot]'",
    )


def test_mil_executor_runs_core_ml_without_torch(device, tmp_path, record_property):
    venv, src, _ = device
    folder = export_tiny_chat(tmp_path, ("coreml",))["coreml"]
    pip_install(venv, src, "onnx,openvino,coreml")
    assert torch_is_missing(venv)
    record_property("measured", f"the same venv with [coreml] added, after these runs: {du_mb(venv)} MB")
    want = generate_json(lambda *a: edgekv(*a), folder)
    got = generate_json(lambda *a: device_edgekv(venv, *a), folder)
    assert got["tokens"] == want["tokens"] and got["text"] == want["text"]
