"""The slot and visibility arithmetic, slot by slot, against a plain Python model of the rule."""

import numpy as np
import pytest
import torch

from exporter.cache import chunk_writes, slot_positions, visible
from runtimes.slots import own_parts, slot_of, stack_parts


def simulate(n_tokens: int, sink: int, window: int) -> list[int]:
    """Write tokens 0..n-1 one by one into S + W slots by the rule (runtimes/slots.py); return what each holds."""
    slots = [-1] * (sink + window)
    for p in range(n_tokens):
        slots[slot_of(p, sink, window)] = p
    return slots


def rule_visible(p: int, q: int, sink: int, window: int) -> bool:
    return q <= p and (q < min(p + 1, sink) or q > p - window)


CASES = [(0, 5), (1, 7), (4, 9), (4, 1), (3, 2)]


@pytest.mark.parametrize("sink,window", CASES)
def test_slot_positions_match_simulation(sink, window):
    for n in range(0, sink + 4 * window + 3):  # several wraps
        got = slot_positions(torch.tensor([n - 1]), sink, window).tolist()
        assert got == simulate(n, sink, window), (n, got)


@pytest.mark.parametrize("sink,window", CASES)
def test_slot_of_is_the_rule(sink, window):
    """The first S tokens stay; each later one replaces the oldest window token (a ring walked in order)."""
    ring = list(range(sink, sink + window))  # the window's slots, oldest write first
    for p in range(sink + 3 * window):
        want = p if p < sink else ring.pop(0)
        if p >= sink:
            ring.append(want)
        assert slot_of(p, sink, window) == want


@pytest.mark.parametrize("sink,window", CASES)
def test_cache_holds_exactly_the_visible_tokens(sink, window):
    """Before token p is written, the cache plus p itself is exactly the set the rule lets p see."""
    for p in range(sink + 4 * window):
        held = [q for q in slot_positions(torch.tensor([p - 1]), sink, window).tolist() if q >= 0] + [p]
        keys = torch.tensor(held)
        vis = visible(torch.tensor([p]), keys, sink, window)[0].tolist()
        want = {q for q in range(p + 1) if rule_visible(p, q, sink, window)}
        assert {q for q, v in zip(held, vis, strict=True) if v} == want
        assert len(want) == min(p + 1, sink + window)


@pytest.mark.parametrize("sink,window", CASES)
@pytest.mark.parametrize("chunk", [1, 3, 11])
def test_chunk_writes_keep_newest_token_per_slot(sink, window, chunk):
    for start in range(0, sink + 3 * window, 2):
        written, src = chunk_writes(torch.tensor([start]), chunk, sink, window)
        before, after = simulate(start, sink, window), simulate(start + chunk, sink, window)
        for j in range(sink + window):
            if written[j]:
                assert after[j] == start + int(src[j])
            else:
                assert after[j] == before[j]


def test_stacked_cache_round_trips_through_parts_of_their_own_width():
    """A hybrid model's 2L parts (global 8 slots, local 7) stack at 8 with zeros past a part's own slots, and come
    back exactly; parts of an export where every layer had 8 (before own-size layers) take the 8 as they are."""
    rng = np.random.default_rng(0)
    widths = [7, 8, 7] * 2
    parts = [rng.standard_normal((1, w, 4)).astype(np.float32) for w in widths]
    stacked = stack_parts(parts, 8)
    assert stacked.shape == (2, 3, 1, 8, 4) and not stacked[:, [0, 2], :, 7].any()
    assert all(np.array_equal(a, b) for a, b in zip(own_parts(stacked, widths), parts, strict=True))
    assert [p.shape[1] for p in own_parts(stacked, [8] * 6)] == [8] * 6
