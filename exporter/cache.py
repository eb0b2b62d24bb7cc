"""The attention-sink + ring-buffer cache contract, as tensor arithmetic.

S sink slots keep tokens 0..S-1 forever; W window slots form a ring of the most recent tokens.
Token p lives in slot p (p < S) or S + (p - S) mod W. Token p sees the first min(p+1, S) tokens and
the most recent W tokens up to itself. Rotary positions are positions inside the cache: sinks at
0..S-1, window tokens at S, S+1, ... in age order. Every function here is branch-free in the
position, so `torch.export` traces it once for all positions.
"""

from __future__ import annotations

import torch


def slot_of(p: int, sink: int, window: int) -> int:
    """The slot token `p` is written to (plain Python; the rule itself)."""
    return p if p < sink else sink + (p - sink) % window


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


def rope_indices(
    q_pos: torch.Tensor, k_pos: torch.Tensor, start: torch.Tensor, sink: int, window: int, table: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotary table rows for queries and keys, in two frames whose differences are the contract's.

    Sink frame: sink key q sits at q, the query at min(p, C - 1).
    Window frame (shifted by the call's start so angles stay small): key q at q - start + W,
    query p at p - start + W, so the query-key difference is the true distance p - q.
    Returns (query row in sink frame, query row in window frame, key row, key-is-sink mask).
    """
    cap = sink + window
    q_sink = torch.clamp(q_pos, max=cap - 1)
    q_win = q_pos - start + window
    k_is_sink = torch.logical_and(k_pos >= 0, k_pos < sink)
    k_row = torch.where(k_is_sink, k_pos, k_pos - start + window)
    return q_sink, q_win, torch.clamp(k_row, 0, table - 1), k_is_sink


def chunk_writes(start: torch.Tensor, chunk: int, sink: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a chunk of tokens start..start+chunk-1: which slots it overwrites and with which token.

    Returns (slot written mask [C], chunk index feeding each slot [C], clamped into range). When a
    chunk is longer than the ring, the newest token for a slot wins, as feeding one at a time would.
    """
    after = slot_positions(start + chunk - 1, sink, window)
    written = after >= start
    return written, torch.clamp(after - start, 0, chunk - 1)
