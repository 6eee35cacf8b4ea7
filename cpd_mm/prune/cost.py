"""Parameters and FLOPs of the *deployed* structure for a keep-mask.

Sparsity is counted on the model after surgery: when a channel goes, its
producer rows, its consumers' input columns, norms and passengers go too.
Counting analytically from the comb records is exact for the handled layers
and takes microseconds, which the greedy selection needs.
"""
import numpy as np
import torch.nn as nn

from ..comb.groups import CombResult


class CostModel:
    """``params(kept)`` and ``flops(kept)`` for bool masks over channels.

    FLOPs are multiply-accumulates of convs and linears at the traced input
    size (scale-free: only ratios are used).
    """

    def __init__(self, model: nn.Module, comb: CombResult):
        self.comb = comb
        modules = dict(model.named_modules())
        self.items = []  # (kind, classes arrays, constants)
        handled = 0
        for name, rec in comb.records.items():
            m = modules[name]
            # an attention module's out_proj is part of the record
            own = sum(p.numel() for p in m.parameters(
                recurse=rec['kind'] == 'mha'))
            handled += own
            cin = comb.classes(rec['in']) if 'in' in rec else None
            cout = comb.classes(rec['out']) if 'out' in rec else None
            bias = getattr(m, 'bias', None) is not None
            if rec['kind'] == 'conv':
                g = rec['groups']
                if rec.get('dw'):
                    mult = m.out_channels // g
                    self.items.append(('dw', cin, None, dict(
                        k=rec['kernel'] * mult, bias=mult if bias else 0,
                        sp=rec['spatial'])))
                else:
                    self.items.append(('conv', cin, cout, dict(
                        k=rec['kernel'], g=g, bias=bias, sp=rec['spatial'])))
            elif rec['kind'] == 'linear':
                self.items.append(('conv', cin, cout, dict(
                    k=1, g=1, bias=bias, sp=rec['spatial'])))
            elif rec['kind'] == 'mha':
                self.items.append(('mha', cin, cout, dict(
                    qk=comb.classes(rec['qk']), v=comb.classes(rec['v']),
                    bias=m.in_proj_bias is not None, sp=rec['tokens'])))
            elif rec['kind'] == 'norm':
                per = own // max(len(rec['in']), 1)
                self.items.append(('vec', cin, None, dict(per=per)))
        seen = set()
        for ps in comb.passengers:
            key = (ps['name'], ps['axis'])
            if key in seen:
                continue
            seen.add(key)
            p = model.get_parameter(ps['name']) \
                if ps['name'] in dict(model.named_parameters()) else None
            if p is None:
                continue
            handled += p.numel()
            per = p.numel() // p.shape[ps['axis']]
            self.items.append(('vec', comb.classes(ps['atoms']), None,
                               dict(per=per)))
        self.fixed = sum(p.numel() for p in model.parameters()) - handled
        self.total_params = self.params(np.ones(comb.num_classes, bool))
        self.total_flops = self.flops(np.ones(comb.num_classes, bool))

    @staticmethod
    def _count(cls, kept):
        if cls is None:
            return 0
        return int(np.where(cls >= 0, kept[np.maximum(cls, 0)], True).sum())

    def _costs(self, kept):
        params = flops = 0
        for kind, cin, cout, c in self.items:
            if kind == 'conv':
                i, o = self._count(cin, kept), self._count(cout, kept)
                w = o * (i // c['g']) * c['k']
                params += w + (o if c['bias'] else 0)
                flops += w * c['sp']
            elif kind == 'dw':
                n = self._count(cin, kept)
                params += n * (c['k'] + c['bias'])
                flops += n * c['k'] * c['sp']
            elif kind == 'mha':
                i, o = self._count(cin, kept), self._count(cout, kept)
                qk, v = self._count(c['qk'], kept), self._count(c['v'], kept)
                rows = 2 * qk + v
                params += rows * i + o * v + (rows + o if c['bias'] else 0)
                flops += c['sp'] * (rows * i + o * v + c['sp'] * (qk + v))
            else:
                params += self._count(cin, kept) * c['per']
        return params + self.fixed, flops

    def measure(self, kept: np.ndarray):
        """``(params, flops)`` of the deployed model for ``kept``."""
        return self._costs(kept)

    def params(self, kept: np.ndarray) -> int:
        return self._costs(kept)[0]

    def flops(self, kept: np.ndarray) -> int:
        return self._costs(kept)[1]

    def marginal(self, kept: np.ndarray, metric: str = 'params') -> np.ndarray:
        """Approximate saving of removing each channel alone (per class)."""
        save = np.zeros(self.comb.num_classes)
        for kind, cin, cout, c in self.items:
            if kind == 'conv':
                i, o = self._count(cin, kept), self._count(cout, kept)
                per_in = o * c['k'] / c['g'] * (c['sp'] if metric == 'flops'
                                                 else 1)
                per_out = ((i // c['g']) * c['k']) * (
                    c['sp'] if metric == 'flops' else 1) + (
                        c['bias'] if metric == 'params' else 0)
                for cls, per in ((cin, per_in), (cout, per_out)):
                    ok = cls[cls >= 0]
                    np.add.at(save, ok, per)
            elif kind == 'mha':
                i, o = self._count(cin, kept), self._count(cout, kept)
                qk, v = self._count(c['qk'], kept), self._count(c['v'], kept)
                f = c['sp'] if metric == 'flops' else 1
                b = 1 if c['bias'] and metric == 'params' else 0
                for cls, per in ((cin, (2 * qk + v) * f),
                                 (cout, (v + b) * f),
                                 (c['qk'], 2 * (i + b) * f),
                                 (c['v'], (i + o + b) * f)):
                    np.add.at(save, cls[cls >= 0], per)
            elif kind == 'dw':
                ok = cin[cin >= 0]
                per = c['k'] * (c['sp'] if metric == 'flops' else 1) + (
                    c['bias'] if metric == 'params' else 0)
                np.add.at(save, ok, per)
            elif metric == 'params':
                ok = cin[cin >= 0]
                np.add.at(save, ok, c['per'])
        return save
