"""Record a model's real forward pass at the aten level.

Why a ``TorchDispatchMode`` and not ``torch.fx`` or the autograd graph:
MMPretrain/MMSegmentation models branch on shapes and data samples (fx cannot
trace them), and the autograd graph loses views, in-place ops and the
identity of parameters used directly.  The dispatcher sees every op that
really runs, with its arguments and outputs; module hooks tell which module
ran it, and stop ops/normalisations are handled per module type
(:mod:`cpd_mm.comb.modules`) so their inner aten ops need no rules.
"""
import os
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .modules import handler_for
from .ops import RULES
from .space import TensorInfo, UnionFind, along, channel_axis, empty_ids

STOP_OPS = {'convolution', 'linear', 'addmm', 'conv2d', 'conv1d', 'conv3d',
            'baddbmm', 'addbmm', '_convolution', 'embedding'}
NO_CHANNEL_OPS = {'zeros', 'ones', 'empty', 'full', 'arange', 'zeros_like',
                  'ones_like', 'empty_like', 'full_like', 'rand', 'randn',
                  'rand_like', 'randn_like', 'scalar_tensor', 'linspace',
                  'bernoulli', 'bernoulli_', 'uniform_', 'normal_',
                  'new_zeros', 'new_ones', 'new_empty', 'new_full', 'sym_size',
                  'sym_numel', 'sym_stride', 'is_same_size', '_local_scalar_dense',
                  'item', 'eye', 'tril', 'triu', 'randint', 'randperm',
                  'empty_strided', 'zero_', 'argmax', 'argmin', 'sort',
                  'topk', '_assert_async', 'argsort', 'any', 'all'}


def default_forward(model: nn.Module, x: torch.Tensor):
    """Run every branch that training runs: a segmentor's auxiliary heads are
    traced too (``mode='tensor'`` skips them), so their inputs shrink."""
    if hasattr(model, 'decode_head') and hasattr(model, 'extract_feat'):
        feats = model.extract_feat(x)
        outs = [model.decode_head(feats)]
        aux = getattr(model, 'auxiliary_head', None)
        if aux is not None:
            heads = aux if isinstance(aux, nn.ModuleList) else [aux]
            outs += [h(feats) for h in heads]
        return outs
    if hasattr(model, 'extract_feat') and hasattr(model, 'head'):
        return model(x, mode='tensor')
    return model(x)


class CombTracer(TorchDispatchMode):
    """Traces one forward pass and collects channel atoms and members."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.uf = UnionFind()
        self.infos: Dict[int, tuple] = {}
        self.names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), n)
        for n, b in model.named_buffers(remove_duplicate=False):
            self.names.setdefault(id(b), n)
        self.stack: List[str] = []
        self.suppress = 0
        self.current_op = ''
        self.records: Dict[str, dict] = {}     # module name -> surgery record
        self.producers: List[dict] = []
        self.channelwise: List[dict] = []
        self.passengers: List[dict] = []
        self.frozen: List[tuple] = []          # (atoms, reason)
        self.sdpa: List[dict] = []
        self.views: List[dict] = []
        self.sites: List[dict] = []            # gate sites: module outputs
        self._site_of: Dict[int, int] = {}     # id(gated tensor) -> site
        self.masked_norms = set()
        self.calls = defaultdict(int)
        self.debug = os.environ.get('CPD_MM_DEBUG') == '1'
        self.unhandled_ops = defaultdict(int)

    # ------------------------------------------------------------ helpers
    def new_atoms(self, n):
        return self.uf.new(n)

    def tensors_of(self, obj):
        return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]

    def info(self, t) -> TensorInfo:
        hit = self.infos.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        name = self.names.get(id(t))
        if name is not None:
            return TensorInfo(empty_ids(t.dim()), False,
                              {name: tuple(range(t.dim()))})
        return TensorInfo(empty_ids(t.dim()), True)

    def set_info(self, t, info):
        if info.ids.ndim != t.dim():
            info.ids = info.ids.reshape([1] * (t.dim() - info.ids.ndim) +
                                        list(info.ids.shape)) \
                if info.ids.ndim < t.dim() else empty_ids(t.dim())
        self.infos[id(t)] = (t, info)

    def is_param_like(self, t):
        i = self.info(t)
        return bool(i.src) and not i.has_ids

    def freeze(self, atoms, reason):
        atoms = np.asarray(atoms).ravel()
        atoms = np.unique(atoms[atoms >= 0])
        if atoms.size:
            where = self.stack[-1] if self.stack else '<model>'
            self.frozen.append((atoms, f'{reason} (in {where})'))

    def attach(self, info, ids, ch, width, kind):
        """A parameter-derived block meets channels: it is a passenger."""
        line = along(ids, ch, width)
        if not info.src:
            self.freeze(line, f'{kind} with a tensor of fixed channel width')
            return
        for pname, amap in info.src.items():
            pax = amap[ch] if ch < len(amap) else None
            if pax is None:
                self.freeze(line, f'parameter {pname} is mixed along a '
                            'channel axis')
            else:
                self.passengers.append(dict(name=pname, axis=pax, atoms=line))

    def module_record(self, name, kind):
        return self.records.setdefault(name, dict(kind=kind))

    def add_producer(self, name, atoms, out):
        self.producers.append(dict(
            name=name, atoms=atoms,
            numel_per_channel=out.numel() // max(len(atoms), 1)))

    def add_channelwise(self, name, atoms, norm=False, src_lin=None):
        self.channelwise.append(dict(name=name, atoms=atoms, norm=norm,
                                     follows=src_lin))

    def record_view(self, out, ids):
        ch = channel_axis(ids)
        if ch is not None and self.stack:
            self.views.append(dict(module=self.stack[-1], size=out.shape[ch],
                                   atoms=along(ids, ch, out.shape[ch])))

    def record_sdpa(self, q, info):
        self.sdpa.append(dict(module=self.stack[-1] if self.stack else '',
                              producer=info.lin, q_ids=info.ids,
                              head_dim=q.shape[-1]))

    # ----------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress:
            return out
        name = func.overloadpacket.__name__
        self.current_op = name
        ins = self.tensors_of((args, kwargs))
        self._use(ins, 'aten.' + name)
        res, failed = None, False
        rule = RULES.get(name)
        if rule is not None:
            try:
                res = rule(self, args, kwargs, out)
            except Exception as e:  # a rule that cannot follow: freeze
                if self.debug:
                    raise
                failed = True
                self._unknown(name, ins, f'rule for aten.{name} failed: {e!r}')
        if res is None and not failed and name not in NO_CHANNEL_OPS:
            self._unknown(name, ins)
        outs = self.tensors_of(out)
        if isinstance(res, TensorInfo):
            res = [res] + [None] * (len(outs) - 1)
        for i, t in enumerate(outs):
            r = res[i] if isinstance(res, list) and i < len(res) else None
            if r is None:
                r = TensorInfo(empty_ids(t.dim()), True)
            self.set_info(t, r)
        return out

    def _use(self, tensors, user):
        for t in tensors:
            i = self._site_of.get(id(t))
            if i is not None:
                self.sites[i]['users'].append(user)

    def _drop_redundant_sites(self):
        """A gate right before a BatchNorm is redundant: the BatchNorm's own
        output is gated, and nothing else reads the tensor."""
        self.sites = [s for s in self.sites
                      if not (s['users'] and all(u.startswith('bn:')
                                                  for u in s['users']))]

    def _unknown(self, name, ins, why=None):
        infos = [self.info(t) for t in ins]
        if name in STOP_OPS:
            params = [n for i in infos for n in i.src]
            why = why or (f'functional {name} with parameter(s) '
                          f'{", ".join(params) or "?"} (not a known module)')
        else:
            self.unhandled_ops[name] += 1
            why = why or f'no channel rule for aten.{name}'
        for i in infos:
            if i.has_ids:
                self.freeze(i.ids, why)

    # -------------------------------------------------------- module hooks
    def _pre(self, name, module):
        def hook(mod, args, kwargs):
            self.stack.append(name)
            self.calls[name] += 1
            if self.suppress:
                self.suppress += 1
                return
            if handler_for(mod) is not None:
                self.suppress += 1
                kind = 'bn:' if isinstance(mod, nn.modules.batchnorm._BatchNorm) \
                    else 'module:'
                self._use(self.tensors_of((args, kwargs)), kind + name)
            else:
                self._use(self.tensors_of((args, kwargs)), 'call:' + name)
        return hook

    def _post(self, name, module):
        handler = handler_for(module)
        leaf = not any(True for _ in module.children()) or handler

        def hook(mod, args, kwargs, out):
            self.stack.pop()
            if self.suppress > 1 or (self.suppress == 1 and handler is None):
                self.suppress -= 1 if self.suppress > 1 else 0
                return
            if handler is not None:
                self.suppress -= 1
                self.stack.append(name)
                x = args[0] if args else next(iter(kwargs.values()))
                o = out[0] if isinstance(out, tuple) else out
                x_in = (args, kwargs) if handler.kind in ('opaque', 'mha') \
                    else x
                try:
                    info = handler.trace(self, name, mod, self.info(x)
                                         if isinstance(x, torch.Tensor)
                                         else None, x_in, o)
                except Exception as e:
                    if self.debug:
                        raise
                    for t in self.tensors_of((args, kwargs)):
                        self.freeze(self.info(t).ids,
                                    f'{name}: handler failed ({e!r})')
                    info = TensorInfo(empty_ids(o.dim()), True)
                self.stack.pop()
                self.set_info(o, info)
            if leaf and isinstance(out, torch.Tensor):
                info = self.info(out)
                # a gate is only needed where removed channels are not
                # already zero (after a conv or BatchNorm, not after a ReLU
                # that follows a gate)
                if info.has_ids and not info.z:
                    # the gated model multiplies this output by its mask,
                    # which yields a new tensor: mirror that here
                    new = out.detach()  # a new tensor object, no copy
                    self.set_info(new, TensorInfo(info.ids, True,
                                                  lin=info.lin))
                    self._site_of[id(new)] = len(self.sites)
                    self.sites.append(dict(module=name,
                                           call=self.calls[name] - 1,
                                           ids=info.ids, users=[]))
                    return new
        return hook

    def run(self, x, forward: Optional[Callable] = None):
        forward = forward or default_forward
        handles = []
        for name, m in self.model.named_modules():
            handles.append(m.register_forward_pre_hook(
                self._pre(name, m), with_kwargs=True))
            handles.append(m.register_forward_hook(
                self._post(name, m), with_kwargs=True))
        try:
            with torch.no_grad(), self:
                out = forward(self.model, x)
            for t in self.tensors_of(out):
                self.freeze(self.info(t).ids, 'model output')
                self._use([t], 'output')
            self._drop_redundant_sites()
        finally:
            for h in handles:
                h.remove()
        self.output = out
        return self
