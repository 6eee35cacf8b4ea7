"""Gates: switch channels off in a running model without changing its shape.

Every gate site found by the tracer (a leaf-module output whose removed
channels would not be zero) is multiplied by the channel mask. Handlers that
gate inside a module get their own forward there, only while some of its
channels are removed: module handlers (attention projections) through
:meth:`~cpd_mm.comb.handlers.ModuleHandler.gate_forward`, op handlers (norm
statistics over active channels only) through
:meth:`~cpd_mm.comb.handlers.OpHandler.gate_patches`. With that, a gated
model and its physically pruned version compute the same function (the
equivalence invariant).

Gates live outside the model's module tree, so its ``state_dict`` is
unchanged; the mask is plain data that the pruning hook checkpoints. Index
tensors live on the model's device; a mask change costs one copy to it.
"""
import contextlib
import types
from collections import defaultdict
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

from .groups import CombResult
from .handlers import handler_for, op_handlers
from .space import along, channel_axis


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
        # forwards that gate inside a module: masked parameters, op
        # handlers' patches, module handlers (installed only while their
        # channels are masked)
        self._patches = {}  # name -> (channel set, forward factory)
        # output gates: a module whose gate parameters (weight rows and bias
        # of a conv or linear, norm affine) scale each output channel is
        # gated by masking those (cost: its parameters); others by
        # multiplying their outputs (cost: the activations)
        per_call: Dict[str, Dict[int, np.ndarray]] = defaultdict(dict)
        for s in comb.sites:
            per_call[s.module][s.call] = s.ids
        self._sites, self._site_channels, self._cache = {}, {}, {}
        self._param_gates = []  # (module name, [(param, axis)], index)
        for name, calls in per_call.items():
            if self._add_param_patch(name, calls):
                continue
            ids = [calls.get(i) for i in range(max(calls) + 1)]
            self._sites[name] = [None if a is None else self._index(a)
                                 for a in ids]
            self._site_channels[name] = [None if a is None else
                                         self._channel_set(a) for a in ids]
            self._handles.append(self.modules[name].register_forward_hook(
                self._site_hook(name)))
        # a new pass restarts the per-call counters: at the model's own
        # forward, and at its first module (wrappers such as the distiller
        # call the model's methods, not its forward)
        self._handles.append(model.register_forward_pre_hook(
            lambda *a: self._calls.clear()))
        if comb.first_module in self.modules:
            self._handles.append(self.modules[comb.first_module]
                                 .register_forward_pre_hook(
                                     lambda *a: self._calls.clear()))
        self._op_updates = []       # called with every new mask
        self._op_patch_names = set()  # kept as they are while probing
        for h in op_handlers():
            for patch in h.gate_patches(self.modules, comb,
                                        comb.op_records.get(h.key, []),
                                        self._calls):
                self._add_op_patch(patch)
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
        full = np.append(kept, True)  # index -1: atoms without a channel
        for update in self._op_updates:
            update(full, self.device)
        for gate, idx in self._param_gates:
            gate[0] = self.mask[idx]
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

    def _add_param_patch(self, name, calls) -> bool:
        """Gate ``name``'s output channels through its gate parameters;
        False if it has none that cover them.

        Per call, whichever is smaller is multiplied by the mask: the gate
        parameters (large batches: a weight is smaller than its output) or
        the output (a small batch, e.g. verification at batch 1). Both give
        the same outputs and gradients."""
        m = self.modules[name]
        h, rec = handler_for(m), self.comb.records.get(name)
        lines, axes = [], set()
        for ids in calls.values():
            ch = channel_axis(ids)
            if ch is None:
                return False
            lines.append(along(ids, ch, ids.shape[ch]))
            axes.add(ch - ids.ndim)
        if h is None or rec is None or len(axes) != 1 or any(
                not np.array_equal(a, lines[0]) for a in lines[1:]):
            return False
        params = [(pn, ax) for pn, ax in h.site_parameters(m, rec)
                  if isinstance(getattr(m, pn, None), nn.Parameter)]
        if not params or any(getattr(m, pn).shape[ax] != len(lines[0])
                             for pn, ax in params):
            return False
        out_axis = axes.pop()
        n_param = sum(getattr(m, pn).numel() for pn, _ in params)
        idx = self._index(lines[0])
        gate = [None]  # this module's mask entries, set by set_kept
        self._param_gates.append((gate, idx))

        def make():
            def forward(self_, *args, **kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                g = gate[0]
                if x.numel() * len(g) < n_param * x.shape[out_axis]:
                    # the output is the smaller tensor here
                    out = type(self_).forward(self_, *args, **kwargs)
                    shape = [1] * out.dim()
                    shape[out_axis] = -1
                    return out * g.view(shape).to(out)
                saved = {}
                for pn, ax in params:
                    p = self_._parameters[pn]
                    shape = [1] * p.dim()
                    shape[ax] = -1
                    saved[pn] = p
                    self_._parameters[pn] = p * g.view(shape).to(p)
                try:
                    return type(self_).forward(self_, *args, **kwargs)
                finally:
                    self_._parameters.update(saved)
            return forward
        self._patches[name] = (self._channel_set(lines[0]), make)
        return True

    def _add_op_patch(self, patch):
        chans = np.unique(np.concatenate(
            [self._channel_set(a) for a in patch.atoms]))
        if patch.module in self._patches:  # never both: handlers hide ops
            raise RuntimeError(f'{patch.module} has two gating forwards')
        self._patches[patch.module] = (chans, patch.make)
        self._op_updates.append(patch.update)
        self._op_patch_names.add(patch.module)

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

    @contextlib.contextmanager
    def probing(self, values: torch.Tensor):
        """Every gate multiplies by ``values`` (entries per channel, plus a
        trailing 1) for a while, masked or not, e.g. a leaf tensor that
        requires grad: explicit gate gradients. Op handlers' patches
        (statistics over active channels) keep the current mask."""
        saved_mask, saved_active = self.mask, self._active
        saved_gates = [gate[0] for gate, _ in self._param_gates]
        added = [n for n in self._patches if n not in self._installed and
                 n not in self._op_patch_names]
        self.mask = values
        self._active = {n: [c is not None for c in chans]
                        for n, chans in self._site_channels.items()}
        for gate, idx in self._param_gates:
            gate[0] = values[idx]
        for name in added:
            self._install(name, self._patches[name][1]())
        try:
            yield
        finally:
            for name in added:
                self._uninstall(name)
            self.mask, self._active = saved_mask, saved_active
            for (gate, _), g in zip(self._param_gates, saved_gates):
                gate[0] = g

    @contextlib.contextmanager
    def detached(self):
        """The model without gates for a while (e.g. to copy it), then the
        same gates and mask again."""
        kept = self.kept
        self.remove()
        try:
            yield self.model
        finally:
            self.__init__(self.model, self.comb)
            self.set_kept(kept)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for name in list(self._installed):
            self._uninstall(name)
        self._handles = []
