"""Gates: switch channels off in a running model without changing its shape.

Every leaf-module output that carries channels of a group (a *gate site*
found by the tracer) is multiplied by the channel mask, so removed channels
are zero wherever they are summed or normalised.  LayerNorm and GroupNorm
over gated channels compute their statistics over active channels only; with
that, a gated model and its physically pruned version compute the same
function (the equivalence invariant).

Gates live outside the model's module tree, so its ``state_dict`` is
unchanged; the mask is plain data that the pruning hook checkpoints.
"""
import types
from collections import defaultdict
import numpy as np
import torch
import torch.nn as nn

from ..comb.groups import CombResult


class ChannelGates:
    """Attach channel masks to ``model`` according to ``comb``.

    Args:
        model: the model that was combed (same module names).
        comb: result of :func:`cpd_mm.comb.comb_model`.

    Use :meth:`set_kept` with a bool array over ``comb.num_classes`` (or
    :meth:`set_plan`), and :meth:`remove` to detach.
    """

    def __init__(self, model: nn.Module, comb: CombResult):
        self.model = model
        self.comb = comb
        p = next(iter(model.parameters()))
        self.mask = torch.ones(comb.num_classes + 1, device=p.device)
        self._handles = []
        self._calls = defaultdict(int)
        modules = dict(model.named_modules())
        sites = defaultdict(dict)
        for s in comb.sites:
            idx = comb.classes(s['ids'])
            idx = np.where(idx >= 0, idx, comb.num_classes)
            sites[s['module']][s['call']] = torch.as_tensor(idx)
        self._per_call = {}
        self._active = {}
        for name, calls in sites.items():
            n = max(calls) + 1
            self._per_call[name] = [calls.get(i) for i in range(n)]
            self._handles.append(modules[name].register_forward_hook(
                self._site_hook(name)))
        self._handles.append(model.register_forward_pre_hook(
            lambda *a: self._calls.clear()))
        self._patched = []
        for name in comb.masked_norms:
            rec = comb.records[name]
            idx = comb.classes(rec['in'])
            idx = torch.as_tensor(np.where(idx >= 0, idx, comb.num_classes))
            self._patch_norm(modules[name], idx)
        for name, rec in comb.records.items():
            if rec['kind'] == 'mha':
                self._patch_attention(modules[name], rec)
        self.set_kept(np.ones(comb.num_classes, dtype=bool))

    # ------------------------------------------------------------- masks
    def set_kept(self, kept: np.ndarray) -> None:
        kept = np.asarray(kept, dtype=bool)
        self.mask[:-1] = torch.as_tensor(kept.astype(np.float32)).to(
            self.mask.device)
        # sites whose channels are all kept cost nothing
        full = np.append(kept, True)
        self._active = {name: [idx is not None and
                               not full[idx.numpy()].all() for idx in calls]
                        for name, calls in self._per_call.items()}

    def set_plan(self, plan: dict) -> None:
        self.set_kept(self.comb.kept_classes_from_plan(plan))

    @property
    def kept(self) -> np.ndarray:
        return self.mask[:-1].detach().cpu().numpy() > 0.5

    def _gate(self, idx, like):
        if self.mask.device != like.device:
            self.mask = self.mask.to(like.device)
        return self.mask[idx.to(like.device)].to(like.dtype)

    def _site_hook(self, name):
        per_call = self._per_call[name]

        def hook(module, args, out):
            if not isinstance(out, torch.Tensor):
                return None
            i = self._calls[name] % len(per_call)
            self._calls[name] += 1
            idx = per_call[i]
            if not self._active[name][i] or idx.dim() != out.dim():
                return None
            return out * self._gate(idx, out)
        return hook

    # ---------------------------------------------------- masked norms
    def _patch_norm(self, m, idx):
        gates = self

        if isinstance(m, nn.LayerNorm):
            def forward(self_, x):
                g = gates._gate(idx, x)
                n = g.sum().clamp_min(1)
                mean = (x * g).sum(-1, keepdim=True) / n
                xc = (x - mean) * g
                var = (xc * xc).sum(-1, keepdim=True) / n
                y = xc * torch.rsqrt(var + self_.eps)
                if self_.weight is not None:
                    y = y * self_.weight + self_.bias
                return y * g
        else:  # GroupNorm: statistics per group over its active channels
            def forward(self_, x):
                g = gates._gate(idx, x)
                G = self_.num_groups
                shp = x.shape
                gx = g.view(1, G, -1, *([1] * (x.dim() - 2)))
                xs = x.reshape(shp[0], G, shp[1] // G, *shp[2:])
                dims = tuple(range(2, xs.dim()))
                n = (gx.expand_as(xs)[:1]).sum(dims, keepdim=True)
                mean = (xs * gx).sum(dims, keepdim=True) / n
                xc = (xs - mean) * gx
                var = (xc * xc).sum(dims, keepdim=True) / n
                y = (xc * torch.rsqrt(var + self_.eps)).reshape(shp)
                view = (1, -1) + (1, ) * (x.dim() - 2)
                if self_.weight is not None:
                    y = y * self_.weight.view(view) + self_.bias.view(view)
                return y * g.view(view)
        m.forward = types.MethodType(forward, m)
        self._patched.append(m)

    def _patch_attention(self, m, rec):
        """nn.MultiheadAttention: removed channels are zero rows of its
        in/out projections (its inner tensors have no module boundary)."""
        from torch.nn.utils.stateless import _reparametrize_module
        from ..comb.attention import masked_attention_params
        gates, cls = self, self.comb.classes

        def mask_of(atoms):
            idx = torch.as_tensor(np.where(cls(atoms) >= 0, cls(atoms),
                                           self.comb.num_classes))
            return gates._gate(idx, m.in_proj_weight)

        def forward(self_, *args, **kwargs):
            params = masked_attention_params(self_, rec, mask_of)
            with _reparametrize_module(self_, params):
                return type(self_).forward(self_, *args, **kwargs)
        m.forward = types.MethodType(forward, m)
        self._patched.append(m)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for m in self._patched:
            del m.forward  # back to the class's forward
        self._handles, self._patched = [], []
