"""One small runner per format with the same shape: load a folder, reset, feed tokens at a position,
get the last token's logits. `open_artifact` picks the runner from the folder's manifest.

runtimes/ is the bottom layer: it needs NumPy, tokenizers and jinja2 plus the one runtime a folder's format
runs on, and never imports exporter/ (which imports torch), so a device runs artifacts without the export stack.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np

from runtimes.errors import EdgekvError, require
from runtimes.manifest import (
    MANIFEST,
    REEXPORT,
    check_declared,
    check_identity,
    load_tokenizer,
    read_manifest,
    special_tokens,
)
from runtimes.progress import say
from runtimes.slots import cache_slots, layer_geometry, own_parts, slot_of, stack_parts

# target: (runner module, the runtime it imports, the extra that installs that runtime)
RUNNERS = {
    "executorch": ("runtimes.executorch_runner", "executorch.runtime", "executorch"),
    "onnx": ("runtimes.onnx_runner", "onnxruntime", "onnx"),
    "openvino": ("runtimes.openvino_runner", "openvino", "openvino"),
    "coreml": ("runtimes.coreml_runner", "coremltools", "coreml"),
}


def threads() -> int:
    """EDGEKV_THREADS: the threads each runtime may use (unset or 0: the runtime's default, every core)."""
    value = os.environ.get("EDGEKV_THREADS", "0")
    if not value.isdigit():
        raise EdgekvError(f"EDGEKV_THREADS={value!r} is not a number of threads; set it to 1, 2, ... or unset it")
    return int(value)


class Runner:
    """Shared part of every runner. Subclasses implement `_run(tokens [1, T] int array, pos) -> logits [V]`.

    Reset only moves the stream back to position 0: the contract masks every slot not written in the
    current stream, so stale cache contents are never read and need no clearing.
    """

    note = ""  # said on stderr when the runner is opened, e.g. that it is not the format's own runtime

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.chunk, self.vocab_size = manifest["chunk"], manifest["vocab_size"]
        tokens = next(t for t in manifest["inputs"] if t["role"] == "tokens")
        self.token_dtype = np.int32 if tokens["dtype"] == "int32" else np.int64
        self.tokenizer = load_tokenizer(self.folder)
        if special_tokens(self.folder, self.tokenizer) != manifest["special_tokens"]:
            raise EdgekvError(
                f"{self.folder}: {MANIFEST}'s special_tokens differ from the tokenizer's; "
                f"restore {MANIFEST} or {REEXPORT}"
            )
        self.pos = 0

    def check_model(
        self,
        stamped: str | None,
        declared: dict[str, tuple[str, list]],
        sections: tuple[str, ...] = ("inputs", "outputs", "state"),
    ) -> None:
        """The manifest against the model file: the identity it records and the tensors it declares."""
        check_identity(self.folder, self.manifest, stamped)
        check_declared(self.folder, self.manifest, declared, sections)

    def reset(self) -> None:
        self.pos = 0

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Feed tokens at the current position (full chunks through prefill, the rest through decode)."""
        if not tokens:
            raise ValueError("feed() needs at least one token")
        i = 0
        while i < len(tokens):
            n = self.chunk if len(tokens) - i >= self.chunk and self.chunk > 1 else 1
            logits = self._run(np.asarray([tokens[i : i + n]], dtype=self.token_dtype), self.pos)
            self.pos += n
            i += n
        return logits

    def feed_all_logits(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits of every token, one decode call each (the artifact returns only the last token's)."""
        if pos != self.pos:
            raise ValueError(f"stream is at position {self.pos}, not {pos}")
        return np.stack([self.feed([t]) for t in tokens])

    def _run(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        raise NotImplementedError

    def cache_state(self) -> np.ndarray:
        """A copy of the cache, stacked [2, L, KV, C, D] in the runner's cache dtype (runtimes/session.py), C the
        widest layer's slots."""
        return stack_parts(list(self.cache), cache_slots(self.manifest))

    def set_cache_state(self, cache: np.ndarray) -> None:
        """Replace the cache's contents from a stacked cache (cast to the runner's dtype), in place."""
        for part, own in zip(self.cache, own_parts(cache, [p.shape[1] for p in self.cache]), strict=True):
            part[...] = own

    def _cache_buffer(self) -> np.ndarray | list[np.ndarray]:
        """Zeroed cache parts for a graph that reads its cache as 2L inputs (role "cache", keys of each layer, then
        values), each of its layer's own slots: `buffer[j]` is input j, memory the runtime reads in place. One
        buffer [2L, KV, C, D] where every layer has the same slots (its writes then one assignment), else a list."""
        caches = [i for i in self.manifest["inputs"] if i["role"] == "cache"]
        self.cache_inputs = [i["name"] for i in caches]
        shapes = [i["shape"] for i in caches]
        if all(shape == shapes[0] for shape in shapes):
            return np.zeros([len(caches), *shapes[0]], np.float32)
        return [np.zeros(shape, np.float32) for shape in shapes]

    def _write_entries(self, cache: np.ndarray, entries: np.ndarray, pos: int) -> None:
        """Write a chunk's cache entries [2, L, KV, T, D] (the `cache_update` output) into their slots of the
        buffer, in place. A slot repeated within the chunk (a chunk longer than the ring) keeps the later entry,
        as NumPy assigns repeated indices in order."""
        entries = entries.reshape(len(cache), *entries.shape[2:])
        geometry = layer_geometry(self.manifest)
        for s, w in set(geometry):  # layers sharing a geometry in one assignment
            slots = [slot_of(p, s, w) for p in range(pos, pos + entries.shape[2])]
            layers = [i for i, g in enumerate(geometry) if g == (s, w)]
            if len(layers) == len(geometry):
                cache[:, :, slots] = entries
                continue
            for row in layers + [len(geometry) + i for i in layers]:  # their keys, then their values
                cache[row][:, slots] = entries[row]


def open_artifact(folder: Path) -> Runner:
    manifest = read_manifest(folder)
    module_name, runtime, extra = RUNNERS[manifest["target"]]
    require(runtime, extra)  # a missing runtime is an install to make, not a broken folder
    module = importlib.import_module(module_name)
    try:
        runner = module.load(Path(folder), manifest)
    except EdgekvError:
        raise
    except Exception as e:
        raise EdgekvError(
            f"{folder}: cannot load the {manifest['target']} model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); re-export with `edgekv export --force`"
        ) from e
    if runner.note:
        say(f"edgekv: note: {runner.note}")
    return runner
