"""The slot rule of the attention-sink + ring-buffer cache, as integer arithmetic (docs/cache.md).

S sink slots keep tokens 0..S-1 forever; W window slots form a ring of the most recent tokens. The exported
graphs compute the same rule with tensors (exporter/cache.py); runners use this one to place cache writes.
"""

from __future__ import annotations

import numpy as np

# The contract's defaults: 4 sinks (StreamingLM's choice) and a 1,020-slot ring, a 1,024-slot cache in all.
DEFAULT_SINK, DEFAULT_WINDOW = 4, 1020


def slot_of(p: int, sink: int, window: int) -> int:
    """The slot token `p` is written to."""
    return p if p < sink else sink + (p - sink) % window


def layer_geometry(manifest: dict) -> list[tuple[int, int]]:
    """(S, W) of each layer: the manifest's sink and window, except a hybrid model's sliding layers (its `local`
    entry), which keep a plain ring of their model's window, S = 0 (docs/cache.md, "Hybrid models")."""
    local = manifest.get("local") or {"window": 0, "layers": []}
    layers = set(local["layers"])
    return [
        (0, local["window"]) if i in layers else (manifest["sink"], manifest["window"])
        for i in range(manifest["architecture"]["num_layers"])
    ]


def cache_slots(manifest: dict) -> int:
    """Slots per layer in the stacked cache (sessions, Core ML's state): the widest layer's S + W (narrower layers
    leave the rest unused)."""
    return max(s + w for s, w in layer_geometry(manifest))


def part_slots(manifest: dict) -> list[int]:
    """Slots of each of the 2L cache parts (keys of layers 0..L-1, then values): its layer's own S + W."""
    own = [s + w for s, w in layer_geometry(manifest)]
    return own + own


def stack_parts(parts: list[np.ndarray], slots: int) -> np.ndarray:
    """2L cache parts [KV, C_j, D] as the stacked cache [2, L, KV, slots, D]; a narrower part's extra slots are
    zeros, never read."""
    kv, d = parts[0].shape[0], parts[0].shape[2]
    out = np.zeros((len(parts), kv, slots, d), parts[0].dtype)
    for full, part in zip(out, parts, strict=True):
        full[:, : part.shape[1]] = part
    return out.reshape(2, -1, kv, slots, d)


def own_parts(cache: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    """The stacked cache [2, L, KV, C, D] as 2L views [KV, widths[j], D], the slots each part's buffer has (its
    layer's own S + W; C for all in an export made before layers had their own)."""
    return [full[:, :n] for full, n in zip(cache.reshape(-1, *cache.shape[2:]), widths, strict=True)]
