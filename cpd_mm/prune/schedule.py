"""Greedy channel selection towards a parameter or FLOPs budget."""
import numpy as np

from ..comb.groups import CombResult
from .cost import CostModel


def select_channels(scores: np.ndarray, kept: np.ndarray, comb: CombResult,
                    cost: CostModel, target: float, metric: str = 'params',
                    min_channels: int = 1) -> np.ndarray:
    """Remove the lowest-scoring channels until ``metric`` of the deployed
    model is at most ``target`` (an absolute count).

    Channels are compared across all groups; frozen channels and the last
    ``min_channels`` of every group are never removed.  Savings are summed
    with marginal costs and checked exactly after each round, so the result
    lands on the budget within one channel's cost.

    Returns:
        The new keep-mask (``kept`` is not modified).
    """
    kept = kept.copy()
    measure = cost.params if metric == 'params' else cost.flops
    left = {i: int(kept[g.classes].sum()) for i, g in enumerate(comb.groups)}
    for _ in range(20):
        current = measure(kept)
        if current <= target:
            break
        saving = cost.marginal(kept, metric)
        cand = np.nonzero(kept & ~comb.frozen_classes & (saving > 0))[0]
        if cand.size == 0:
            break
        cand = cand[np.argsort(scores[cand], kind='stable')]
        need = current - target
        got = 0.0
        removed = 0
        for c in cand:
            gi = int(comb.group_of_class[c])
            if gi < 0 or left[gi] <= min_channels:
                continue
            kept[c] = False
            left[gi] -= 1
            got += saving[c]
            removed += 1
            if got >= need:
                break
        if removed == 0:
            break
    return kept


def sparsity_at(cur_iter: int, begin: int, end: int, target: float) -> float:
    """Linear ramp of the sparsity target from ``begin`` to ``end``."""
    if cur_iter < begin:
        return 0.0
    if end <= begin:
        return target
    return target * min(1.0, (cur_iter - begin) / float(end - begin))
