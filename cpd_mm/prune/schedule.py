"""Greedy, cost-aware channel selection towards a budget, and the ramp."""
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


def _chunks(g, gi, kept, removable, scores, saving, floor, round_to,
            ranking):
    """Removal candidates of one group, lowest scores first: the channels
    that bring it to a multiple of ``round_to``, then ``round_to`` at a
    time, down to ``floor``. Values never decrease along a group, so the
    global order keeps every group's chunks in sequence."""
    left = int(kept[g.channels].sum())
    cand = g.channels[removable[g.channels]]
    cand = cand[np.lexsort((cand, scores[cand]))]
    size, pos, value, out = left % round_to or round_to, 0, -np.inf, []
    while left - size >= floor and pos + size <= cand.size:
        members = cand[pos:pos + size]
        s = float(scores[members].sum())
        if ranking == 'cost':  # importance per unit of what it saves
            s /= max(float(saving[members].sum()), 1e-300)
        else:
            s /= size
        value = max(value, s)
        # ties (e.g. equal scores) go to the group that keeps the largest
        # share of its channels: they spread instead of emptying a group
        out.append((value, -left / g.size, gi, pos, members))
        left, pos, size = left - size, pos + size, round_to
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
    ``round_to``. With ``round_to > 1`` every group keeps a multiple of
    ``round_to`` channels (or all of them): channels leave in chunks (first
    down to the next multiple, then ``round_to`` at a time). Each round
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
    for _ in range(64):
        need = cost.evaluate(kept, metric) - target
        if need <= 0:
            break
        saving = cost.marginal(kept, metric)
        removable = kept & ~comb.frozen_channels & (saving > 0)
        removable &= ~protected
        chunks = []
        for gi, g in enumerate(comb.groups):
            chunks += _chunks(g, gi, kept, removable, scores, saving,
                              floors[gi], round_to, ranking)
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
