"""Greedy channel selection towards a parameter or FLOPs budget."""
from typing import Optional

import numpy as np

from ..comb.groups import CombResult
from .cost import CostModel


def select_channels(scores: np.ndarray, kept: np.ndarray, comb: CombResult,
                    cost: CostModel, target: float, metric: str = 'params',
                    min_channels: int = 1, round_to: int = 1,
                    protected: Optional[np.ndarray] = None) -> np.ndarray:
    """Remove the lowest-scoring channels until ``metric`` of the deployed
    model is at most ``target`` (an absolute count).

    Channels are compared across all groups; frozen channels, ``protected``
    ones and the last ``min_channels`` of every group are never removed.  With ``round_to > 1``
    every group keeps a multiple of ``round_to`` channels (or all of them):
    channels leave a group in chunks (first down to the next multiple, then
    ``round_to`` at a time) ranked by their mean score, and a group keeps at
    least ``min_channels`` rounded up to a multiple of ``round_to``.  Savings
    are summed with marginal costs and checked exactly after each round, so
    the result lands on the budget within one chunk's cost.

    Returns:
        The new keep-mask (``kept`` is not modified).
    """
    kept = kept.copy()
    measure = cost.params if metric == 'params' else cost.flops
    floor = -(-max(min_channels, round_to) // round_to) * round_to
    for _ in range(20):
        current = measure(kept)
        if current <= target:
            break
        saving = cost.marginal(kept, metric)
        removable = kept & ~comb.frozen_channels & (saving > 0)
        if protected is not None:
            removable &= ~protected
        chunks = []  # (mean score, group, position in group, classes)
        for gi, g in enumerate(comb.groups):
            left = int(kept[g.channels].sum())
            cand = g.channels[removable[g.channels]]
            cand = cand[np.lexsort((cand, scores[cand]))]
            size = left % round_to or round_to
            pos = 0
            while left - size >= floor and pos + size <= cand.size:
                members = cand[pos:pos + size]
                chunks.append((float(scores[members].mean()), gi, pos,
                               members))
                left, pos, size = left - size, pos + size, round_to
        if not chunks:
            break
        # a group's chunks have non-decreasing means: ties keep their order
        chunks.sort(key=lambda c: c[:3])
        need = current - target
        got = 0.0
        for _, _, _, members in chunks:
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
