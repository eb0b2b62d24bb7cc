"""The slot rule of the attention-sink + ring-buffer cache, as integer arithmetic (docs/cache.md).

S sink slots keep tokens 0..S-1 forever; W window slots form a ring of the most recent tokens. The exported
graphs compute the same rule with tensors (exporter/cache.py); runners use this one to place cache writes.
"""

from __future__ import annotations

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
    """Slots per layer in the cache buffer: the widest layer's S + W (narrower layers leave the rest unused)."""
    return max(s + w for s, w in layer_geometry(manifest))
