"""Greedy, cost-aware channel selection towards a budget, and the ramp."""
import heapq
import math
from typing import Optional

import numpy as np

from ..comb.groups import CombResult
from .cost import CostModel

RANKINGS = ('cost', 'score')


def _floor(group, min_channels, max_removal, round_to):
    """Channels ``group`` keeps at least (a multiple of ``round_to``)."""
    n = max(min_channels, math.ceil((1.0 - max_removal) * group.size - 1e-9))
    n = -(-max(n, 1) // round_to) * round_to
    return min(n, group.size)


def _value(members, scores, saving, ranking):
    s = float(scores[members].sum())
    if ranking == 'cost':  # importance per unit of what it saves
        return s / max(float(saving[members].sum()), 1e-300)
    return s / len(members)


def _set_chunks(segments, kept, removable, scores, saving, round_to,
                ranking):
    """Removal candidates of one segment set (segments that producing
    modules output together, see :meth:`CombResult.producer_segments`),
    lowest scores first: one chunk that brings every segment to a multiple
    of ``round_to`` (so every producer, a union of segments, is on one),
    then ``round_to`` at a time from any segment. Returns ``(value,
    members)`` pairs whose values never decrease."""
    align, seqs = [], []
    for c in segments:
        cand = c[removable[c]]
        cand = cand[np.lexsort((cand, scores[cand]))]
        k = int(kept[c].sum()) % round_to
        if k > cand.size:  # cannot reach a multiple: none of them is cut
            return []
        align.append(cand[:k])
        value, seq = -np.inf, []
        for pos in range(k, cand.size - round_to + 1, round_to):
            members = cand[pos:pos + round_to]
            value = max(value, _value(members, scores, saving, ranking))
            seq.append((value, members))
        seqs.append(seq)
    align = np.concatenate(align)
    value, out = -np.inf, []
    if align.size:
        value = _value(align, scores, saving, ranking)
        out.append((value, align))
    for v, members in heapq.merge(*seqs, key=lambda c: c[0]):
        value = max(value, v)
        out.append((value, members))
    return out


def _chunks(g, gi, segment_sets, kept, removable, scores, saving, floor,
            round_to, ranking):
    """Removal candidates of one group: its segment sets' chunks merged by
    value, each set's in its own order, down to the group's ``floor``.
    Values never decrease along a group, so the global order keeps every
    group's chunks in sequence."""
    merged = heapq.merge(*[[(v, si, m) for v, m in _set_chunks(
        sset, kept, removable, scores, saving, round_to, ranking)]
        for si, sset in enumerate(segment_sets)], key=lambda c: c[0])
    left, value, out, blocked = int(kept[g.channels].sum()), -np.inf, [], set()
    for v, si, members in merged:
        if si in blocked or left - len(members) < floor:
            blocked.add(si)  # a set's later chunks need this one
            continue
        value = max(value, v)
        # ties (e.g. equal scores) go to the group that keeps the largest
        # share of its channels: they spread instead of emptying a group
        out.append((value, -left / g.size, gi, len(out), members))
        left -= len(members)
    return out


def select_channels(scores: np.ndarray, kept: np.ndarray, comb: CombResult,
                    cost: CostModel, target: float, metric: str = 'params',
                    min_channels: int = 1, round_to: int = 1,
                    protected: Optional[np.ndarray] = None,
                    max_removal: float = 0.8,
                    ranking: str = 'cost') -> np.ndarray:
    """Remove channels until ``metric`` of the deployed model is at most
    ``target`` (an absolute count, or milliseconds for 'latency').

    Candidates are compared across all groups. With ``ranking='cost'`` a
    candidate's value is its importance per unit of the saving of
    ``metric`` that removing it brings (marginal costs, re-measured every
    round as widths shrink); with ``'score'`` its mean score (the paper's
    ranking, with memory-normalised scores). Equal values are broken in
    favour of the group that keeps the largest share of its channels.

    Frozen channels, ``protected`` ones, the best channel of every
    producing module, and the floor of every group are never removed: a
    group keeps at least ``min_channels`` and
    ``(1 - max_removal)`` of its channels, rounded up to a multiple of
    ``round_to``. With ``round_to > 1`` every producing module keeps a
    multiple of ``round_to`` of its output channels (or all of them): each
    segment of a group (see :meth:`CombResult.producer_segments`: the
    branches of a concat) loses channels in chunks, first down to the next
    multiple (together with the segments that a producer outputs with it),
    then ``round_to`` at a time. Each round
    takes chunks until their marginal savings cover what is missing, then
    measures exactly, so the result lands on the budget within one chunk.

    Returns:
        The new keep-mask (``kept`` is not modified). If the floors stop it
        first, the budget is not met: compare ``cost`` of the result.
    """
    if ranking not in RANKINGS:
        raise ValueError(f'ranking must be one of {RANKINGS}, got {ranking!r}')
    kept = kept.copy()
    floors = [_floor(g, min_channels, max_removal, round_to)
              for g in comb.groups]
    # every producing module keeps one output (its best), or surgery could
    # not build it: a group can span several (the branches of a concat)
    guard = comb.one_per_producer(np.zeros_like(kept),
                                  np.where(kept, scores, -np.inf))
    protected = guard if protected is None else protected | guard
    # round_to holds per producing module: per segment of a group
    segments = comb.producer_segments() if round_to > 1 else \
        [[[g.channels]] for g in comb.groups]
    for _ in range(64):
        need = cost.evaluate(kept, metric) - target
        if need <= 0:
            break
        saving = cost.marginal(kept, metric)
        removable = kept & ~comb.frozen_channels & (saving > 0)
        removable &= ~protected
        chunks = []
        for gi, g in enumerate(comb.groups):
            chunks += _chunks(g, gi, segments[gi], kept, removable, scores,
                              saving, floors[gi], round_to, ranking)
        if not chunks:
            break
        chunks.sort(key=lambda c: c[:4])
        got = 0.0
        for *_, members in chunks:
            kept[members] = False
            got += float(saving[members].sum())
            if got >= need:
                break
    return kept


def sparsity_at(cur_iter: int, begin: int, end: int, target: float) -> float:
    """Linear ramp of the sparsity target from ``begin`` to ``end``."""
    if cur_iter < begin:
        return 0.0
    if end <= begin:
        return target
    return target * min(1.0, (cur_iter - begin) / float(end - begin))
