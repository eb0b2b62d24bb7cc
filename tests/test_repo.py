"""The clone stands on its own: nothing reaches outside the repo, and a wheel carries its data files."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_tracked_file_refers_outside_the_repo():
    outside = "../" + "shared"  # spelled in two parts so this file does not match itself
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    hits = [f.decode() for f in files if f and outside.encode() in (ROOT / f.decode()).read_bytes()]
    assert hits == []


def test_wheel_ships_the_schema_the_default_validation_text_and_the_license(tmp_path):
    src = tmp_path / "src"  # a copy of what the wheel is built from: setuptools writes build/ beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "exporter", "runtimes"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("edgekv-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"runtimes/edgekv.schema.json", "runtimes/data/shakespeare-excerpt.txt"} <= names
    text = zipfile.ZipFile(wheel).read("runtimes/data/shakespeare-excerpt.txt")
    assert text == (ROOT / "runtimes" / "data" / "shakespeare-excerpt.txt").read_bytes()
    info = "edgekv-0.1.0.dist-info"
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert {"License-Expression: Apache-2.0", "License-File: LICENSE"} <= set(metadata.splitlines())
    assert zipfile.ZipFile(wheel).read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert "Project-URL: Homepage, https://edgekv.dev" in metadata.splitlines()
