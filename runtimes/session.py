"""Session files: a stream saved to disk and resumed later, in another process, or on another target of the same
export settings.

A session is one safetensors file (never a pickle). Its tensor `cache` is the stacked cache [2, L, KV, n, D] in the
runner's cache dtype, keys stored rotated at their slot (docs/cache.md), n = min(position, C): the slots written so
far, as slots fill in order until the ring first wraps and unwritten ones are never read. Its string metadata:
`edgekv_session` (the session format), `identity` (the export identity without target and chunk, which do not
change the cache), `position` (tokens in the stream), `cache_dtype`, `sha256` (of the cache bytes: safetensors has
no checksum of its own) and `state` (JSON the command resumes from: tokens sampled but not yet fed, a chat's
messages). A fixed cache makes it a bounded file: at most 2 x L x KV x C x D values.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from runtimes.errors import EdgekvError
from runtimes.manifest import IDENTITY, lookup
from runtimes.slots import cache_slots

SESSION_FORMAT = "1"
# A cache is the same whatever target or chunk produced it; the rest of the identity must match.
# A hybrid model's local ring ("local") follows from its weights, which the identity already pins.
SESSION_IDENTITY = tuple(k for k in IDENTITY if k not in ("target", "chunk", "local"))
CHECKED = ("edgekv_session", "identity", "position", "cache_dtype", "state")  # metadata the checksum covers


def session_identity(manifest: dict) -> dict:
    return {key: lookup(manifest, key) for key in SESSION_IDENTITY}


def checksum(cache: np.ndarray, metadata: dict) -> str | None:
    """sha256 of the cache bytes and, after them, the metadata strings that say what they are (a flipped digit of
    the position must not pass), each after a newline: the same bytes the iOS app hashes."""
    h = hashlib.sha256(np.ascontiguousarray(cache).tobytes())
    for key in CHECKED:
        if not isinstance(metadata.get(key), str):
            return None
        h.update(b"\n" + metadata[key].encode())
    return h.hexdigest()


def save_session(runner, path: Path, state: dict | None = None) -> int:
    """Write the runner's stream to `path` atomically (a temporary file beside it, then a rename: a crash
    mid-save leaves the previous session whole). Returns the file's size in bytes."""
    from safetensors.numpy import save_file

    path = Path(path)
    cache = runner.cache_state()
    cache = np.ascontiguousarray(cache[:, :, :, : min(runner.pos, cache.shape[3])])
    metadata = {
        "edgekv_session": SESSION_FORMAT,
        "identity": json.dumps(session_identity(runner.manifest)),
        "position": str(runner.pos),
        "cache_dtype": cache.dtype.name,
        "state": json.dumps(state or {}),
    }
    metadata["sha256"] = checksum(cache, metadata)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({"cache": cache}, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_session(path: Path, manifest: dict) -> tuple[np.ndarray, int, dict]:
    """(cache, position, state) of a session file, checked against the artifact's manifest. Every problem is
    one EdgekvError; nothing is changed."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    redo = "delete it or pass another --session"
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            cache = f.get_tensor("cache") if "cache" in f.keys() else None
    except FileNotFoundError:
        raise EdgekvError(f"{path}: no such session file") from None
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
        raise EdgekvError(f"{path} is not a readable session file ({str(e).splitlines()[0][:120]}); {redo}") from None
    if meta.get("edgekv_session") != SESSION_FORMAT or cache is None:
        raise EdgekvError(f"{path} is not an edgekv session (format {meta.get('edgekv_session')!r}); {redo}")
    if checksum(cache, meta) != meta.get("sha256"):
        raise EdgekvError(f"{path} is corrupt (its checksum does not match); {redo}")
    try:
        saved, position, state = json.loads(meta["identity"]), int(meta["position"]), json.loads(meta["state"])
    except (KeyError, ValueError, TypeError):
        raise EdgekvError(f"{path} is corrupt (its metadata does not parse); {redo}") from None
    want = session_identity(manifest)
    for key in SESSION_IDENTITY:
        if saved.get(key) != want[key]:
            raise EdgekvError(
                f"{path} was saved from another model or cache ({key} {saved.get(key)!r}, this artifact "
                f"has {want[key]!r}); start a new session or pass the artifact it came from"
            )
    arch = manifest["architecture"]
    slots = cache_slots(manifest)
    shape = (2, arch["num_layers"], arch["num_kv_heads"], min(max(position, 0), slots), arch["head_dim"])
    if (
        tuple(cache.shape) != shape
        or cache.dtype not in (np.float16, np.float32)
        or position < 0
        or not isinstance(state, dict)
    ):
        raise EdgekvError(f"{path} is corrupt (cache {list(cache.shape)} {cache.dtype}, position {position}); {redo}")
    full = np.zeros((*shape[:3], slots, shape[4]), cache.dtype)  # slots not yet written: never read
    full[:, :, :, : shape[3]] = cache
    return full, position, state


def load_session(runner, path: Path) -> dict:
    """Resume the runner's stream from `path` (checked first: on any error the runner is as it was). fp32 and
    fp16 caches load into either (a cast: exact upward, rounded to fp16 downward). Returns the saved state."""
    cache, position, state = read_session(path, runner.manifest)
    runner.set_cache_state(cache)
    runner.pos = position
    return state
