"""Gates: switch channels off in a running model without changing its shape.

Every gate site found by the tracer (a leaf-module output whose removed
channels would not be zero) is multiplied by the channel mask. Layer and
group norms whose statistics run over removed channels compute them over
active channels only, and handlers that gate inside their module (attention
projections) get their own forward; both only while some of their channels
are removed. With that, a gated model and its physically pruned version
compute the same function (the equivalence invariant).

Gates live outside the model's module tree, so its ``state_dict`` is
unchanged; the mask is plain data that the pruning hook checkpoints. Index
tensors live on the model's device; a mask change costs one copy to it.
"""
import math
import types
from collections import defaultdict
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .groups import CombResult
from .handlers import handler_for

_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_GROUP_NORMS = (F.group_norm, torch.group_norm)


def masked_layer_norm(x, normalized_shape, weight, bias, eps, g, axis):
    """Layer norm whose statistics count channels with ``g == 1`` only;
    ``axis`` (negative) is the channel axis, one of the normalised ones."""
    k = len(normalized_shape)
    dims = tuple(range(-k, 0))
    shape = [1] * x.dim()
    shape[axis] = -1
    gv = g.view(shape)
    per = math.prod(normalized_shape) // normalized_shape[axis + k]
    n = gv.sum().clamp_min(1) * per
    mean = (x * gv).sum(dims, keepdim=True) / n
    xc = (x - mean) * gv
    var = (xc * xc).sum(dims, keepdim=True) / n
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * gv


def masked_group_norm(x, num_groups, weight, bias, eps, g):
    """Group norm (channels on axis 1) over active channels only."""
    N, C = x.shape[:2]
    G = num_groups
    xs = x.reshape(N, G, C // G, *x.shape[2:])
    gx = g.view(1, G, C // G, *([1] * (x.dim() - 2)))
    dims = tuple(range(2, xs.dim()))
    n = gx.sum(2, keepdim=True).clamp_min(1) * math.prod(x.shape[2:])
    mean = (xs * gx).sum(dims, keepdim=True) / n
    xc = (xs - mean) * gx
    var = (xc * xc).sum(dims, keepdim=True) / n
    y = (xc * torch.rsqrt(var + eps)).reshape(x.shape)
    view = (1, -1) + (1, ) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.view(view)
    if bias is not None:
        y = y + bias.view(view)
    return y * g.view(view)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class _MaskedNorms(TorchFunctionMode):
    """Replaces the norm calls of one module call by masked versions;
    ``sites[i]`` is ``(idx, axis)`` for the i-th norm call, or None."""

    def __init__(self, gates, sites):
        super().__init__()
        self.gates, self.sites, self.i = gates, sites, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layer = func in _LAYER_NORMS
        if not (layer or func in _GROUP_NORMS):
            return func(*args, **kwargs)
        site = self.sites[self.i] if self.i < len(self.sites) else None
        self.i += 1
        if site is None:
            return func(*args, **kwargs)
        idx, axis = site
        x = args[0]
        g = self.gates.mask_for(idx, x)
        if layer:
            return masked_layer_norm(
                x, tuple(_arg(args, kwargs, 1, 'normalized_shape')),
                _arg(args, kwargs, 2, 'weight'), _arg(args, kwargs, 3, 'bias'),
                _arg(args, kwargs, 4, 'eps', 1e-5), g, axis)
        return masked_group_norm(
            x, _arg(args, kwargs, 1, 'num_groups'),
            _arg(args, kwargs, 2, 'weight'), _arg(args, kwargs, 3, 'bias'),
            _arg(args, kwargs, 4, 'eps', 1e-5), g)


class ChannelGates:
    """Attach channel masks to ``model`` according to ``comb``.

    Args:
        model: the model that was combed (same module names).
        comb: result of :func:`cpd_mm.comb.comb_model`.

    Use :meth:`set_kept` with a bool array over ``comb.num_channels`` (or
    :meth:`set_plan`), and :meth:`remove` to detach.
    """

    def __init__(self, model: nn.Module, comb: CombResult):
        self.model, self.comb = model, comb
        p = next(iter(model.parameters()), None)
        self.device = p.device if p is not None else torch.device('cpu')
        self.mask = torch.ones(comb.num_channels + 1, device=self.device)
        self.modules = dict(model.named_modules())
        self._calls = defaultdict(int)
        self._handles = []
        # output gates: module -> per call (index tensor, channel ids)
        per_call: Dict[str, Dict[int, np.ndarray]] = defaultdict(dict)
        for s in comb.sites:
            per_call[s.module][s.call] = s.ids
        self._sites, self._site_channels, self._cache = {}, {}, {}
        for name, calls in per_call.items():
            ids = [calls.get(i) for i in range(max(calls) + 1)]
            self._sites[name] = [None if a is None else self._index(a)
                                 for a in ids]
            self._site_channels[name] = [None if a is None else
                                         self._channel_set(a) for a in ids]
            self._handles.append(self.modules[name].register_forward_hook(
                self._site_hook(name)))
        self._handles.append(model.register_forward_pre_hook(
            lambda *a: self._calls.clear()))
        # forwards that gate inside a module: masked norms, handlers
        self._patches = {}  # name -> (channel set, forward factory)
        norms = defaultdict(lambda: defaultdict(dict))
        for s in comb.norm_sites:
            norms[s.module][s.call][s.index] = (s.atoms, s.axis)
        for name, calls in norms.items():
            self._add_norm_patch(name, calls)
        for name, rec in comb.records.items():
            m = self.modules[name]
            fwd = handler_for(m).gate_forward(m, rec, self._mask_of)
            if fwd is not None:
                chans = np.concatenate([self._channel_set(a) for a in
                                        rec.atom_arrays().values()])
                self._patches[name] = (chans, lambda f=fwd: f)
        self._installed = {}
        self.set_kept(np.ones(comb.num_channels, dtype=bool))

    # ------------------------------------------------------------ helpers
    def _channel_set(self, atoms):
        c = self.comb.channels(atoms).ravel()
        return np.unique(c[c >= 0])

    def _index(self, atoms):
        c = self.comb.channels(atoms)
        return torch.as_tensor(np.where(c >= 0, c, self.comb.num_channels),
                               device=self.device)

    def mask_for(self, idx, like):
        """Mask entries ``idx`` in the dtype and on the device of ``like``."""
        if idx.device != like.device:  # the model moved: follow it once
            self._move(like.device)
            idx = idx.to(like.device)
        return self.mask[idx].to(like.dtype)

    def _mask_of(self, atoms):
        # called by gating forwards on every call: index tensors are cached
        # (keyed by identity: callers pass arrays they keep alive)
        hit = self._cache.get(id(atoms))
        if hit is None or hit[0] is not atoms:
            hit = self._cache[id(atoms)] = (atoms, self._index(atoms))
        return self.mask[hit[1]]

    def _move(self, device):
        self.device = device
        self.mask = self.mask.to(device)
        self._cache = {}
        self._sites = {n: [None if i is None else i.to(device) for i in v]
                       for n, v in self._sites.items()}

    # ------------------------------------------------------------- masks
    def set_kept(self, kept: np.ndarray) -> None:
        kept = np.asarray(kept, dtype=bool)
        if kept.shape != (self.comb.num_channels, ):
            raise ValueError(f'kept mask has shape {kept.shape}, expected '
                             f'({self.comb.num_channels},)')
        self.mask[:-1].copy_(torch.from_numpy(kept.astype(np.float32)))
        removed = ~kept
        # gates whose channels are all kept cost nothing
        self._active = {
            name: [c is not None and bool(removed[c].any()) for c in chans]
            for name, chans in self._site_channels.items()}
        for name, (chans, make) in self._patches.items():
            on = bool(removed[chans].any())
            if on and name not in self._installed:
                self._install(name, make())
            elif not on and name in self._installed:
                self._uninstall(name)

    def set_plan(self, plan: dict) -> None:
        self.set_kept(self.comb.kept_from_plan(plan))

    @property
    def kept(self) -> np.ndarray:
        return self.mask[:-1].detach().cpu().numpy() > 0.5

    @property
    def patched_modules(self) -> List[str]:
        """Modules that currently run a gating forward."""
        return sorted(self._installed)

    # ------------------------------------------------------------- gates
    def _site_hook(self, name):
        idxs = self._sites[name]

        def hook(module, args, out):
            i = self._calls[name] % len(idxs)
            self._calls[name] += 1
            idx = self._sites[name][i]
            if idx is None or not self._active[name][i] or \
                    not isinstance(out, torch.Tensor) or \
                    idx.dim() != out.dim():
                return None
            return out * self.mask_for(idx, out)
        return hook

    def _add_norm_patch(self, name, calls):
        n = max(calls) + 1
        sites = []
        for c in range(n):
            ops = calls.get(c, {})
            sites.append([None if i not in ops else
                          (self._index(ops[i][0]), ops[i][1])
                          for i in range(max(ops) + 1 if ops else 0)])
        chans = np.unique(np.concatenate(
            [self._channel_set(a) for ops in calls.values()
             for a, _ in ops.values()]))
        gates, key = self, name + '#norm'

        def make():
            def forward(self_, *args, **kwargs):
                i = gates._calls[key] % n
                gates._calls[key] += 1
                with _MaskedNorms(gates, sites[i]):
                    return type(self_).forward(self_, *args, **kwargs)
            return forward
        if name in self._patches:  # never both: handlers hide norm ops
            raise RuntimeError(f'{name} has two gating forwards')
        self._patches[name] = (chans, make)

    def _install(self, name, forward):
        m = self.modules[name]
        self._installed[name] = vars(m).get('forward')
        m.forward = types.MethodType(forward, m) if not isinstance(
            forward, types.MethodType) else forward

    def _uninstall(self, name):
        m = self.modules[name]
        old = self._installed.pop(name)
        if old is None:
            del m.forward  # back to the class's forward
        else:
            m.forward = old

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name in list(self._installed):
            self._uninstall(name)
        self._handles = []
