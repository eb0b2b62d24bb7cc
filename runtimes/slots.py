"""The slot rule of the attention-sink + ring-buffer cache, as integer arithmetic (docs/cache.md).

S sink slots keep tokens 0..S-1 forever; W window slots form a ring of the most recent tokens. The exported
graphs compute the same rule with tensors (exporter/cache.py); runners use this one to place cache writes.
"""

from __future__ import annotations


def slot_of(p: int, sink: int, window: int) -> int:
    """The slot token `p` is written to."""
    return p if p < sink else sink + (p - sink) % window
