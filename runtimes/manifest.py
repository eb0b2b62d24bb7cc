"""`edgekv.json`: what an artifact folder holds, so runtimes and the iOS app never guess; and the tokenizer files
beside it."""

from __future__ import annotations

import hashlib
import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from runtimes.errors import EdgekvError

FORMAT_VERSION = 4  # raised whenever an older folder would be misread; older ones are refused with "re-export"
MANIFEST = "edgekv.json"
SCHEMA = Path(__file__).with_name("edgekv.schema.json")  # the one schema; the iOS app is checked against it
REEXPORT = "re-export with `edgekv export --force`"
# What the model file itself records of its export (ONNX metadata_props, OpenVINO rt_info, a constant method of the
# .pte, Core ML user-defined metadata, all under the key "edgekv"), compared with the manifest on every open.
IDENTITY = (
    "format_version",
    "target",
    "sink",
    "window",
    "chunk",
    "vocab_size",
    "source.weights_sha256",
    "quantization.scheme",
    "architecture.num_layers",
    "architecture.num_kv_heads",
    "architecture.head_dim",
    "local",
)
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
    """Every file the manifest lists exists, has a digest, and matches it."""
    for role, name in manifest["files"].items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise EdgekvError(f"{folder / MANIFEST}: files.{role} = {name!r} points outside the folder; {REEXPORT}")
        if not path.exists():
            raise EdgekvError(f"{folder}: {name} ({role}) is missing; {REEXPORT}")
        want = manifest["digests"].get(name)
        if want is None:
            raise EdgekvError(f"{folder / MANIFEST}: digests has no entry for {name}; {REEXPORT}")
        if file_digest(path) != want:
            raise EdgekvError(f"{folder}: {name} is corrupt (checksum mismatch); {REEXPORT}")


def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The folder's manifest, checked against the schema (and its files against their digests)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise EdgekvError(f"{folder}: no such artifact folder; create one with `edgekv export`")
    if not path.is_file():
        raise EdgekvError(f"{folder}: no {MANIFEST}; not an edgekv artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgekvError(f"{path} is corrupt (not valid JSON: {e}); {REEXPORT}") from None
    fmt = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt != FORMAT_VERSION:
        raise EdgekvError(f"{path}: format version {fmt}, this edgekv reads {FORMAT_VERSION}; {REEXPORT}")
    problem = schema_problem(manifest, SCHEMA_DOC)
    if problem:
        raise EdgekvError(f"{path}: {problem}; {REEXPORT}")
    if verify:
        verify_files(folder, manifest)
    return manifest


def lookup(manifest: dict, key: str):
    """A dotted key's value: lookup(m, "source.weights_sha256"); None for an optional key that is absent."""
    for part in key.split("."):
        if part not in manifest and part == "local":
            return None
        manifest = manifest[part]
    return manifest


def identity(manifest: dict) -> str:
    """The export's identity as the model file records it: JSON of the IDENTITY keys."""
    return json.dumps({key: lookup(manifest, key) for key in IDENTITY}, sort_keys=True)


def check_identity(folder: Path, manifest: dict, stamped: str | None) -> None:
    """The manifest agrees with the identity recorded inside the model file (a hand-edited sink or window, a
    manifest copied from another export, a model file from another folder)."""
    model = manifest["files"]["model"]
    try:
        found = json.loads(stamped) if stamped else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise EdgekvError(
            f"{folder}: {model} carries no edgekv identity (written by another tool or an older edgekv); {REEXPORT}"
        )
    for key in IDENTITY:
        if found.get(key) != lookup(manifest, key):
            raise EdgekvError(
                f"{folder}: {MANIFEST} says {key} = {lookup(manifest, key)!r} but {model} was "
                f"exported with {found.get(key)!r}; restore {MANIFEST} or {REEXPORT}"
            )


def same_shape(listed: list, declared: list, chunk: int) -> bool:
    """A manifest shape against a declared one: the token count "T" is a dynamic dim or one entry's (1 or chunk),
    a dynamic dim (None) takes any size; every other dim is equal."""
    return len(listed) == len(declared) and all(
        (b is None or b in (1, chunk)) if a == "T" else (b is None and isinstance(a, int)) or a == b
        for a, b in zip(listed, declared, strict=True)
    )


def check_declared(
    folder: Path,
    manifest: dict,
    declared: dict[str, tuple[str, list]],
    sections: tuple[str, ...] = ("inputs", "outputs", "state"),
) -> None:
    """The tensors the model declares ({name: (dtype, shape)}, as its runtime reports them) are the ones the
    manifest lists in `sections`, with the same dtypes and shapes."""
    model = manifest["files"]["model"]
    listed = {t["name"]: t for s in sections for t in manifest[s]}
    for name, (dtype, shape) in declared.items():
        t = listed.get(name)
        if t is None:
            raise EdgekvError(f"{folder}: {model} has a tensor {name!r} that {MANIFEST} does not list; {REEXPORT}")
        if t["dtype"] != dtype or not same_shape(t["shape"], shape, manifest["chunk"]):
            shown = [d if d is not None else "?" for d in shape]
            raise EdgekvError(
                f"{folder}: {MANIFEST} says {name} is {t['dtype']} {t['shape']} but {model} declares "
                f"{dtype} {shown}; restore {MANIFEST} or {REEXPORT}"
            )
    if missing := sorted(set(listed) - set(declared)):
        raise EdgekvError(f"{folder}: {MANIFEST} lists {missing[0]!r}, which {model} does not have; {REEXPORT}")


# The subset of JSON Schema (2020-12) that edgekv.schema.json uses, so the base install needs no validator package;
# tests/test_manifest_fuzz.py checks that it agrees with the jsonschema package on mutated manifests.
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number"):
        ok = isinstance(value, int) or (kind == "number" and isinstance(value, float))
        return ok and not isinstance(value, bool)
    return isinstance(value, JSON_TYPES[kind])


def schema_problem(value, node: dict, root: dict | None = None, where: str = "") -> str | None:
    """The first way `value` breaks the schema `node`, as "key sink: ...", or None."""
    root = root or node
    if "$ref" in node:
        node = lookup(root, node["$ref"].removeprefix("#/").replace("/", "."))
    at = f"key {where}" if where else "the manifest"
    kinds = node.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_is(value, k) for k in kinds):
        return f"{at} should be {' or '.join(kinds)}, not {type(value).__name__} {json.dumps(value)[:40]}"
    if "const" in node and value != node["const"]:
        return f"{at} should be {node['const']!r}, not {value!r}"
    if "enum" in node and value not in node["enum"]:
        return f"{at} is {value!r}, not one of {', '.join(map(str, node['enum']))}"
    if "minimum" in node and _is(value, "number") and value < node["minimum"]:
        return f"{at} is {value}, below its minimum {node['minimum']}"
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0) or ("pattern" in node and not re.search(node["pattern"], value)):
            return f"{at} is {value[:40]!r}, not a valid value"
    if "oneOf" in node and sum(schema_problem(value, n, root, where) is None for n in node["oneOf"]) != 1:
        return f"{at} is {json.dumps(value)[:40]}, not a valid value"
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            return f"{at} has {len(value)} items, fewer than {node['minItems']}"
        for i, item in enumerate(value):
            if "items" in node and (p := schema_problem(item, node["items"], root, f"{where}[{i}]")):
                return p
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key in node.get("required", []):
            if key not in value:
                return f"key {where + '.' if where else ''}{key} is missing"
        for key, item in value.items():
            sub = props.get(key, node.get("additionalProperties", True))
            name = f"{where}.{key}" if where else key
            if sub is False:
                return f"key {name} is not an edgekv key"
            if isinstance(sub, dict) and (p := schema_problem(item, sub, root, name)):
                return p
    return None


SCHEMA_DOC = json.loads(SCHEMA.read_text())


def load_tokenizer(folder: Path):
    """The fast tokenizer from tokenizer.json (no transformers import on the hot path)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
