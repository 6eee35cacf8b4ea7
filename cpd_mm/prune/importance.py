"""Channel importance: the paper's Hessian score and ablation baselines.

With gated weights θ⊙m at m = 1, the gate gradient of channel c is
∂L/∂m_c = Σ_{i∈c} θ_i ∂L/∂θ_i, summed over the parameters that scale the
channel where it leaves its producers: the producer's norm affine parameters
if a norm follows it (scaling a conv before a BatchNorm changes nothing),
else the producer's weight rows and bias, plus passengers such as pos_embed.
These products are collected by gradient hooks as backward runs, so the
runner's own loss (task + distillation) drives the scores.

Scores (per channel, accumulated over a pruning interval):
  - ``hessian``: (∂L/∂m_c)², the squared-gradient estimate of the Hessian
    diagonal restricted to the gates (the paper's practical score);
  - ``taylor``: |∂L/∂m_c| (first-order Taylor);
  - ``l1``: Σ|θ| of the producer rows (magnitude);
  - ``random``: uniform random.
Memory normalisation divides by the group's activation memory, B·H·W of the
producers' outputs times the group's active channels.
"""
import warnings
from typing import List, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..comb.groups import CombResult

IMPORTANCE_TYPES = ('hessian', 'taylor', 'l1', 'random')


def gate_parameters(model: nn.Module, comb: CombResult) -> List[Tuple]:
    """``[(param, axis, class index per position), ...]`` of gate-equivalent
    parameters."""
    modules = dict(model.named_modules())
    normed = {}
    for name, rec in comb.records.items():
        if rec['kind'] == 'norm' and rec.get('follows'):
            normed.setdefault(rec['follows'], name)
    out = []
    for name, rec in comb.records.items():
        if rec['kind'] == 'mha':
            m = modules[name]
            inner = comb.classes(np.concatenate([rec['qk'], rec['qk'],
                                                 rec['v']]))
            outc = comb.classes(rec['out'])
            for p, cls in ((m.in_proj_weight, inner), (m.in_proj_bias, inner),
                           (m.out_proj.weight, outc), (m.out_proj.bias, outc)):
                if isinstance(p, nn.Parameter):
                    out.append((p, 0, cls))
            continue
        if 'out' not in rec or rec.get('dw'):
            continue
        src = normed.get(name, name)
        m = modules[src]
        atoms = comb.records[src]['in'] if src != name else rec['out']
        cls = comb.classes(atoms)
        for pname in ('weight', 'bias'):
            p = getattr(m, pname, None)
            if isinstance(p, nn.Parameter) and p.shape[0] == len(cls):
                out.append((p, 0, cls))
    seen = set()
    params = dict(model.named_parameters())
    for ps in comb.passengers:
        p = params.get(ps['name'])
        if p is None or (ps['name'], ps['axis']) in seen:
            continue
        seen.add((ps['name'], ps['axis']))
        out.append((p, ps['axis'], comb.classes(ps['atoms'])))
    return out


class ImportanceAccumulator:
    """Collects per-channel scores between pruning steps.

    Args:
        model, comb: the model being pruned and its groups.
        kind: one of :data:`IMPORTANCE_TYPES`.
        seed: for ``random``.
    """

    def __init__(self, model: nn.Module, comb: CombResult,
                 kind: str = 'hessian', seed: int = 0):
        if kind not in IMPORTANCE_TYPES:
            raise ValueError(f'importance must be one of {IMPORTANCE_TYPES},'
                             f' but got {kind!r}')
        self.kind, self.comb, self.seed = kind, comb, seed
        self.scores = np.zeros(comb.num_classes)
        self.iters = 0
        self.skipped = 0
        self._params = gate_parameters(model, comb)
        p0 = self._params[0][0] if self._params else None
        dev = p0.device if p0 is not None else 'cpu'
        self._grad = torch.zeros(comb.num_classes + 1, device=dev)
        self._handles = []
        if kind in ('hessian', 'taylor'):
            for p, axis, cls in self._params:
                idx = torch.as_tensor(np.where(cls >= 0, cls, comb.num_classes))
                self._handles.append(p.register_post_accumulate_grad_hook(
                    self._hook(axis, idx)))

    def _hook(self, axis, idx):
        def fn(p):
            if p.grad is None:
                return
            prod = (p.detach() * p.grad.detach()).float()
            dims = [d for d in range(prod.dim()) if d != axis]
            per = prod.sum(dims) if dims else prod
            if self._grad.device != per.device:
                self._grad = self._grad.to(per.device)
            self._grad.index_add_(0, idx.to(per.device), per)
        return fn

    def step(self) -> None:
        """Close one training iteration: fold its gate gradient in."""
        if self.kind not in ('hessian', 'taylor'):
            self.iters += 1
            return
        g = self._grad[:-1].detach().cpu().double().numpy()
        self._grad.zero_()
        if not np.isfinite(g).all():
            self.skipped += 1
            warnings.warn('CPD importance: non-finite gate gradients in this '
                          'iteration were skipped')
            return
        self.scores += g * g if self.kind == 'hessian' else np.abs(g)
        self.iters += 1

    def current(self, step: int = 0) -> np.ndarray:
        """Scores of every channel (higher = more important)."""
        if self.kind == 'l1':
            s = np.zeros(self.comb.num_classes)
            for p, axis, cls in self._params:
                dims = [d for d in range(p.dim()) if d != axis]
                v = p.detach().abs().float()
                v = (v.sum(dims) if dims else v).cpu().double().numpy()
                ok = cls >= 0
                np.add.at(s, cls[ok], v[ok])
            return s
        if self.kind == 'random':
            return np.random.default_rng(self.seed + step).random(
                self.comb.num_classes)
        return self.scores.copy()

    def reset(self) -> None:
        self.scores[:] = 0
        self.iters = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return dict(scores=self.scores.tolist(), iters=self.iters,
                    skipped=self.skipped)

    def load_state_dict(self, state: dict) -> None:
        s = np.asarray(state['scores'], dtype=np.float64)
        if s.shape != self.scores.shape:
            raise ValueError('checkpointed importance scores do not match '
                             'the model channels')
        self.scores = s
        self.iters = int(state['iters'])
        self.skipped = int(state.get('skipped', 0))


def normalise_by_memory(scores: np.ndarray, comb: CombResult,
                        kept: np.ndarray) -> np.ndarray:
    """Divide each channel's score by its group's activation memory."""
    out = scores.copy()
    for g in comb.groups:
        active = max(int(kept[g.classes].sum()), 1)
        mem = max(g.numel_per_channel, 1) * active
        out[g.classes] = scores[g.classes] / mem
    return out
