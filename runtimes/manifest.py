"""`edgekv.json`: what an artifact folder holds, so runtimes and the iOS app never guess; and the tokenizer files
beside it."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from runtimes.errors import EdgekvError

FORMAT_VERSION = 3  # raised whenever an older folder would be misread; older ones are refused with "re-export"
MANIFEST = "edgekv.json"
SCHEMA = Path(__file__).with_name("edgekv.schema.json")  # the one schema; the iOS app is checked against it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def edgekv_version() -> str:
    try:
        return version("edgekv")
    except PackageNotFoundError:
        return "0+unknown"


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files in name order (an .mlpackage is a folder)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return "sha256:" + h.hexdigest()


def special_tokens(tokenizer_dir: Path, tokenizer) -> dict:
    """bos/eos/pad ids from tokenizer_config.json (strings or AddedToken dicts), by the tokenizer's vocab."""
    cfg_file = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        tok = cfg.get(f"{key}_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        ids[key] = tokenizer.token_to_id(tok) if tok else None
    return ids


def chat_template(tokenizer_dir: Path) -> str | None:
    jinja = tokenizer_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg_file = tokenizer_dir / "tokenizer_config.json"
    return json.loads(cfg_file.read_text()).get("chat_template") if cfg_file.is_file() else None


def verify_files(folder: Path, manifest: dict) -> None:
    for role, name in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise EdgekvError(f"{folder}: {name} ({role}) is missing; re-export with `edgekv export --force`")
        want = manifest.get("digests", {}).get(name)
        if want and file_digest(path) != want:
            raise EdgekvError(f"{folder}: {name} is corrupt (checksum mismatch); "
                              "re-export with `edgekv export --force`")


def read_manifest(folder: Path, verify: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EdgekvError(f"{folder}: no such artifact folder; create one with `edgekv export`")
    if not path.is_file():
        raise EdgekvError(f"{folder}: no {MANIFEST}; not an edgekv artifact folder")
    try:
        manifest = json.loads(path.read_text())
        target, fmt = manifest["target"], manifest["format_version"]
    except (ValueError, KeyError, TypeError) as e:
        raise EdgekvError(f"{path} is corrupt ({type(e).__name__}: {e}); "
                          "re-export with `edgekv export --force`") from None
    if fmt != FORMAT_VERSION:
        raise EdgekvError(f"{path}: format version {fmt}, this edgekv reads {FORMAT_VERSION}; re-export")
    if verify:
        verify_files(folder, manifest)
    manifest["target"] = target
    return manifest


def load_tokenizer(folder: Path):
    """The fast tokenizer from tokenizer.json (no transformers import on the hot path)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
