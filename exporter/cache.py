"""The attention-sink + ring-buffer cache contract, as tensor arithmetic.

S sink slots keep tokens 0..S-1 forever; W window slots form a ring of the most recent tokens.
Token p lives in slot p (p < S) or S + (p - S) mod W. Token p sees the first min(p+1, S) tokens and
the most recent W tokens up to itself. Rotary positions are positions inside the cache: sinks at
0..S-1, window tokens at S, S+1, ... in age order. Every function here is branch-free in the
position, so `torch.export` traces it once for all positions. The rule as integer arithmetic, which the
runtimes use, is `runtimes/slots.py`.
"""

from __future__ import annotations

import torch


def slot_positions(last: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Absolute position held by each of the S + W slots once tokens 0..last were written, or -1.

    `last` is a 1-element int64 tensor; it may be -1 (nothing written yet).
    """
    slots = torch.arange(sink + window, dtype=torch.int64)
    empty = torch.full_like(slots, -1)  # a tensor, not a scalar: Core ML has no where.ScalarOther
    in_sink = torch.where(slots <= last, slots, empty)
    k = slots - sink  # index inside the ring (negative for sink slots; masked below)
    m_end = last - sink  # ring index of the newest window token
    # Largest m <= m_end with m = k (mod W); the offset keeps the remainder's operand non-negative
    # so floor and truncated modulo agree on every backend.
    offset = (sink // window + 2) * window
    m = m_end - torch.remainder(m_end - k + offset, window)
    in_ring = torch.where(m >= 0, sink + m, empty)
    return torch.where(slots < sink, in_sink, in_ring)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """[Tq, Tk] bool: may the query at absolute position q_pos[i] see the key at k_pos[j]?"""
    q = q_pos[:, None]
    k = k_pos[None, :]
    # logical_* rather than & and |: Core ML's converter has no aten.__and__.
    in_range = torch.logical_and(k >= 0, k <= q)
    return torch.logical_and(in_range, torch.logical_or(k < sink, k > q - window))


def slot_index(pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """`slot_of` (runtimes/slots.py) for a tensor of positions >= 0 (the offset keeps the remainder's operand
    non-negative)."""
    ring = sink + torch.remainder(pos - sink + (sink // window + 1) * window, window)
    return torch.where(pos < sink, pos, ring)


def rope_frames(
    q_pos: torch.Tensor, k_pos: torch.Tensor, k_slot: torch.Tensor, sink: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary rows for keys rotated once, at their slot, when written (so a cached key is never rotated again).

    A key in slot j sits at rotary row j. The contract's query-key distance is then reached from three query
    rows, one per frame, chosen per (query, key) pair:
      sink  (key is a sink, slot = position): the query at min(p, C - 1), the contract's own rows;
      ring  (window key in a slot at or before the query's slot): the query at its slot;
      lap   (window key in a slot after the query's, written one lap of the ring earlier): its slot + W.
    In both window frames query row minus key row is p - q, the true distance (< W). Rows stay below C + W.
    Returns (query rows [3, Tq], frame masks [3, Tq, Tk] as bool, exactly one frame true per pair with q >= 0).
    """
    cap = sink + window
    q_slot = slot_index(q_pos, sink, window)
    # minimum rather than clamp: coremltools turns an integer clamp into a float clip.
    rows = torch.stack([torch.minimum(q_pos, torch.tensor([cap - 1])), q_slot, q_slot + window])
    k_is_sink = torch.logical_and(k_pos >= 0, k_pos < sink)[None, :]
    same_lap = k_slot[None, :] <= q_slot[:, None]
    in_ring = torch.logical_not(k_is_sink)
    # The sink mask broadcast to [Tq, Tk] by an always-true comparison, not expand (Core ML's tile).
    frames = torch.stack(
        [
            torch.logical_and(k_is_sink, q_slot[:, None] >= 0),
            torch.logical_and(in_ring, same_lap),
            torch.logical_and(in_ring, torch.logical_not(same_lap)),
        ]
    )
    return rows, frames


def chunk_writes(start: torch.Tensor, chunk: int, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of tokens start..start+chunk-1: which slots it overwrites and with which token.

    Returns (slot written mask [C], chunk index feeding each slot [C], clamped into range). When a
    chunk is longer than the ring, the newest token for a slot wins, as feeding one at a time would.
    """
    after = slot_positions(start + chunk - 1, sink, window)
    written = after >= start
    return written, torch.clamp(after - start, 0, chunk - 1)
