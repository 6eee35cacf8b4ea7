"""Parameters and FLOPs of the *deployed* structure for a keep-mask.

Sparsity is counted on the model after surgery: when a channel goes, its
producer rows, its consumers' input columns, norms and passengers go too.
Every handler states its module's cost as products of channel counts
(:class:`~cpd_mm.comb.handlers.CostTerm`); passengers add one term each.
Evaluating these terms is exact for the handled layers and takes
microseconds, which the greedy selection needs.
"""
from typing import List, Tuple

import numpy as np
import torch.nn as nn

from ..comb.groups import CombResult
from ..comb.handlers import CostTerm, handler_for

METRICS = ('params', 'flops')


class _Factor:
    """Entries of an atom array: ``fixed`` without a channel, ``chans``
    with one (count = fixed + kept entries)."""
    __slots__ = ('fixed', 'chans')

    def __init__(self, comb, atoms):
        c = comb.channels(atoms).ravel()
        self.fixed = int((c < 0).sum())
        self.chans = c[c >= 0]

    def count(self, kept):
        return self.fixed + int(kept[self.chans].sum())


class CostModel:
    """``params(kept)`` and ``flops(kept)`` for bool masks over channels.

    FLOPs are multiply-accumulates of convs, linears and attention products
    at the traced input size (only ratios are used).
    """

    def __init__(self, model: nn.Module, comb: CombResult):
        self.comb = comb
        modules = dict(model.named_modules())
        terms: List[CostTerm] = []
        for name, rec in comb.records.items():
            terms += handler_for(modules[name]).cost_terms(modules[name], rec)
        params = dict(model.named_parameters())
        seen = set()
        for ps in comb.passengers:
            p = params.get(ps.name)
            if p is None or (ps.name, ps.axis) in seen:
                continue
            seen.add((ps.name, ps.axis))
            terms.append(CostTerm('params', p.numel() // p.shape[ps.axis],
                                  (ps.atoms, )))
        self.terms: List[Tuple[str, float, List[_Factor]]] = [
            (t.metric, t.coef, [_Factor(comb, f) for f in t.factors])
            for t in terms]
        full = np.ones(comb.num_channels, dtype=bool)
        total = sum(p.numel() for p in model.parameters())
        self.fixed = total - self._evaluate(full)[0]
        self.total_params, self.total_flops = self.measure(full)

    def _evaluate(self, kept):
        out = {'params': 0.0, 'flops': 0.0}
        for metric, coef, factors in self.terms:
            v = coef
            for f in factors:
                v *= f.count(kept)
            out[metric] += v
        return out['params'], out['flops']

    def measure(self, kept: np.ndarray) -> Tuple[int, int]:
        """``(params, flops)`` of the deployed model for ``kept``."""
        p, f = self._evaluate(kept)
        return int(round(p)) + self.fixed, int(round(f))

    def params(self, kept: np.ndarray) -> int:
        return self.measure(kept)[0]

    def flops(self, kept: np.ndarray) -> int:
        return self.measure(kept)[1]

    def marginal(self, kept: np.ndarray, metric: str = 'params') -> np.ndarray:
        """Saving of removing each channel alone (the derivative of every
        product term), per channel."""
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
        save = np.zeros(self.comb.num_channels)
        for m, coef, factors in self.terms:
            if m != metric:
                continue
            counts = [f.count(kept) for f in factors]
            for j, f in enumerate(factors):
                other = coef
                for i, c in enumerate(counts):
                    if i != j:
                        other *= c
                np.add.at(save, f.chans, other)
        return save
