"""Parameters, FLOPs and latency of the *deployed* structure for a
keep-mask.

Sparsity is counted on the model after surgery: when a channel goes, its
producer rows, its consumers' input columns, norms and passengers go too.
Every handler states its module's cost as products of channel counts
(:class:`~cpd_mm.comb.handlers.CostTerm`); passengers add one term each.
Evaluating these terms is exact for the handled layers and takes
microseconds, which the greedy selection needs. Latency comes from a
:class:`~cpd_mm.deploy.LatencyTable` measured on the deployment runtime:
each timed layer at the widths the keep-mask leaves it.
"""
from typing import List, Tuple

import numpy as np
import torch.nn as nn

from ..comb.groups import CombResult
from ..comb.handlers import CostTerm, TimedLayer, handler_for, op_handlers

METRICS = ('params', 'flops', 'latency')


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
    """``params(kept)``, ``flops(kept)`` and ``latency(kept)`` for bool
    masks over channels.

    FLOPs are multiply-accumulates of convs, linears and attention products
    at the traced input size (only ratios are used). Latency (ms) needs a
    ``latency_table`` of the same model.
    """

    def __init__(self, model: nn.Module, comb: CombResult,
                 latency_table=None):
        self.comb = comb
        self.table = latency_table
        modules = dict(model.named_modules())
        self._timed = self._timed_layers(modules, comb, latency_table) \
            if latency_table is not None else []
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
        self.total_latency = self.latency(full) if self._timed else None

    # ------------------------------------------------------------ latency
    @staticmethod
    def _timed_layers(modules, comb, table):
        """``(layer, factors)`` of every timed layer that comb knows, as
        its handler states it (:class:`TimedLayer`)."""
        layers: List[TimedLayer] = []
        for name in table.layers:
            rec = comb.records.get(name)
            if rec is None:
                continue
            m = modules[name]
            widths = handler_for(m).latency_widths(m, rec)
            if widths is not None:
                layers.append(TimedLayer(name, widths))
        for h in op_handlers():
            layers += h.latency_layers(comb, comb.op_records.get(h.key, []),
                                       table)
        return [(t, [_Factor(comb, a) for a in t.widths]) for t in layers]

    def _widths(self, kept):
        return {t.key: (*t.fixed, *(f.count(kept) for f in factors))
                for t, factors in self._timed}

    def latency(self, kept: np.ndarray) -> float:
        """Predicted ms of the deployed model (the latency table's)."""
        if self.table is None:
            raise ValueError('latency needs a CostModel built with a '
                             'latency_table')
        return self.table.predict(self._widths(kept))

    def _latency_marginal(self, kept):
        """Per channel: ms saved by one fewer channel in every timed layer
        that reads or writes it (finite differences of the table)."""
        save = np.zeros(self.comb.num_channels)
        scale = self.table.scale if self.table.data.get('complete') else 1.0
        w = self._widths(kept)
        for layer, factors in self._timed:
            time = getattr(self.table, layer.lookup)
            t = time(layer.key, *w[layer.key])
            for j, f in enumerate(factors, len(layer.fixed)):
                lower = list(w[layer.key])
                lower[j] -= 1
                if lower[j] < 1:
                    continue
                d = t - time(layer.key, *lower)
                np.add.at(save, f.chans, max(d, 0.0) * scale)
        return save

    def evaluate(self, kept: np.ndarray, metric: str) -> float:
        """The deployed model's ``metric`` for ``kept``."""
        if metric == 'latency':
            return self.latency(kept)
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got '
                             f'{metric!r}')
        return self.measure(kept)[metric == 'flops']

    def total(self, metric: str) -> float:
        return {'params': self.total_params, 'flops': self.total_flops,
                'latency': self.total_latency}[metric]

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
        if metric == 'latency':
            return self._latency_marginal(kept)
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
