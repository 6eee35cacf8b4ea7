"""Normalisation: BatchNorm, LayerNorm (also channel-first) and GroupNorm.

Two parts of one construct. The aten ops (:class:`NormOps`) are the rule:
affine parameters and running statistics are passengers of the normalised
channels; layer and group norms whose statistics run over channels are
recorded as :class:`NormSite`, and the gated model computes them over the
active channels only, so that it matches the pruned model. Modules whose
forward runs these ops, including subclasses with their own forward (a
channel-first LayerNorm that permutes NCHW), follow the same rule: the
module handler (:class:`NormHandler`) is transparent and only keeps the
module's size attributes in step with its parameters.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..space import TensorInfo, along, channel_axis
from .base import (GatePatch, ModuleHandler, ModuleRecord, OpHandler,
                   handler_for, register_handler, register_op_handler)

_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_GROUP_NORMS = (F.group_norm, torch.group_norm)


# ------------------------------------------------------------ records
@dataclass
class NormRecord(ModuleRecord):
    axis: int = 0             # channel axis of the affine parameters
    per_channel_groups: bool = False  # GroupNorm with one channel a group
    channels: Optional[np.ndarray] = None
    atom_fields = ('channels', )


@dataclass
class NormSite:
    """A layer/group normalisation op whose statistics run over channels:
    the gated model normalises over active channels only.

    ``module`` is the innermost module that ran the op, ``call`` its call
    index and ``index`` the op's position among the norm ops of that call.
    ``atoms`` are the channels along ``axis`` of the op's input (negative
    for ``layer_norm``, counted from the end; 1 for ``group_norm``).
    """
    kind: str  # 'layer_norm' or 'group_norm'
    module: str
    call: int
    index: int
    atoms: np.ndarray
    axis: int


# ------------------------------------------------------- module handler
@register_handler
class NormHandler(ModuleHandler):
    """BatchNorm (any dimension, SyncBatchNorm), LayerNorm, GroupNorm."""
    module_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                    nn.GroupNorm)
    transparent = True

    def site_parameters(self, m, rec):
        return [('weight', rec.axis), ('bias', rec.axis)]

    def absorbs_input_gate(self, m):
        return isinstance(m, nn.modules.batchnorm._BatchNorm)

    def prune(self, m, rec, keep):
        # the affine parameters and running statistics are passengers of
        # the norm op: sliced with the other passengers
        n = int(keep(rec.channels).sum())
        if isinstance(m, nn.LayerNorm):
            shape = list(m.normalized_shape)
            shape[rec.axis] = n
            m.normalized_shape = tuple(shape)
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = n
            if rec.per_channel_groups:
                m.num_groups = n
        else:
            m.num_features = n
        return None


# ------------------------------------------------------------ op rules
def _is_tensor(x):
    return isinstance(x, torch.Tensor)


def _passengers(tr, tensors, line, kind):
    for t in tensors:
        if _is_tensor(t) and t.numel() > 1:
            tr.attach_line(tr.info(t), line, 0 if t.dim() == 1 else None,
                           kind)


def _outs(out, first):
    return [first] + [None] * (len(out) - 1) if isinstance(
        out, (tuple, list)) else first


def _norm_record(tr, line, param_axis, per_channel_groups=False):
    """Size attributes of a norm module follow its channels."""
    name = tr.current_module
    m = tr.modules.get(name)
    if m is not None and isinstance(handler_for(m), NormHandler):
        rec = tr.module_record(name, NormRecord)
        rec.axis = param_axis
        rec.per_channel_groups |= per_channel_groups
        rec.merge(tr, channels=line)


_BATCH_NORM_OPS = ('native_batch_norm', '_native_batch_norm_legit',
                   '_native_batch_norm_legit_no_training',
                   '_native_batch_norm_legit_functional', 'cudnn_batch_norm',
                   'miopen_batch_norm')


@register_op_handler
class NormOps(OpHandler):
    """Layer, group and batch normalisation ops."""
    key = 'norm'
    ops = ('native_layer_norm', 'native_group_norm') + _BATCH_NORM_OPS
    # a gate read only by a batch norm is redundant (its output is gated)
    absorbing_ops = ('aten.native_batch_norm',
                     'aten._native_batch_norm_legit',
                     'aten._native_batch_norm_legit_no_training',
                     'aten.cudnn_batch_norm', 'aten.miopen_batch_norm')

    def trace(self, tr, args, kwargs, out):
        if tr.current_op == 'native_layer_norm':
            return self._layer_norm(tr, args, kwargs, out)
        if tr.current_op == 'native_group_norm':
            return self._group_norm(tr, args, kwargs, out)
        return self._batch_norm(tr, args, kwargs, out)

    def _site(self, tr, index, kind, line, axis, param_axis):
        name = tr.current_module
        tr.add_op_record(self, NormSite(kind, name, tr.calls[name] - 1,
                                        index, line, axis))
        _norm_record(tr, line, param_axis)
        tr.add_channelwise(name, line)

    def _layer_norm(self, tr, args, kwargs, out):
        x, shape = args[0], list(args[1])
        w = args[2] if len(args) > 2 else kwargs.get('weight')
        b = args[3] if len(args) > 3 else kwargs.get('bias')
        index = tr.op_index(self.key)
        info = tr.info(x)
        nd, k = x.dim(), len(shape)
        ch = channel_axis(tr.uf.find(info.ids))
        if ch is None:
            return _outs(out, TensorInfo(info.ids, True))
        if ch < nd - k:
            # statistics per channel over positions: LN(0) is the bias
            return _outs(out, TensorInfo(info.ids, False))
        line = along(info.ids, ch, x.shape[ch])
        pax = ch - (nd - k)  # channel axis of weight and bias
        for t in (w, b):
            if _is_tensor(t):
                tr.attach_line(tr.info(t), line, pax, 'layer_norm')
        self._site(tr, index, 'layer_norm', line, ch - nd, pax)
        return _outs(out, TensorInfo(info.ids, True))

    def _group_norm(self, tr, args, kwargs, out):
        x, w, b = args[0], args[1], args[2]
        C, G = int(args[4]), int(args[6])
        index = tr.op_index(self.key)
        info = tr.info(x)
        ch = channel_axis(tr.uf.find(info.ids))
        if ch is None:
            return _outs(out, TensorInfo(info.ids, True))
        if ch != 1:
            tr.freeze(info.ids, 'group_norm over channels off axis 1')
            return _outs(out, TensorInfo(info.ids, True))
        line = along(info.ids, 1, C)
        _passengers(tr, (w, b), line, 'group_norm')
        if G == C:  # one channel per group: no statistic mixes channels
            _norm_record(tr, line, 0, per_channel_groups=True)
            tr.add_channelwise(tr.current_module, line)
            return _outs(out, TensorInfo(info.ids, False))
        # every group keeps the same number of channels: position j of
        # every group is one channel
        tr.uf.union(np.tile(line[:C // G], G), line)
        self._site(tr, index, 'group_norm', line, 1, 0)
        return _outs(out, TensorInfo(info.ids, True))

    def _batch_norm(self, tr, args, kwargs, out):
        x = args[0]
        info = tr.info(x)
        ch = channel_axis(tr.uf.find(info.ids))
        if ch is None:
            return _outs(out, TensorInfo(info.ids, info.z))
        if ch != 1:
            tr.freeze(info.ids, 'batch_norm over channels off axis 1')
            return _outs(out, TensorInfo(info.ids, False))
        line = along(info.ids, 1, x.shape[1])
        _passengers(tr, args[1:5], line, 'batch_norm')
        _norm_record(tr, line, 0)
        tr.add_channelwise(tr.current_module, line)
        # a removed channel becomes the BatchNorm's bias: not zero
        return _outs(out, TensorInfo(info.ids, False))

    def gate_patches(self, modules, comb, records, calls):
        per = {}
        for s in records:
            per.setdefault(s.module, {}).setdefault(s.call, {})[s.index] = s
        return [_norm_patch(modules[name], name, comb, sites, calls)
                for name, sites in per.items()]


# -------------------------------------------------------------- gating
def masked_layer_norm(x, normalized_shape, weight, bias, eps, pos, axis):
    """Layer norm over the active channels only: the native op runs on the
    channels at positions ``pos`` of ``axis`` (negative, one of the
    normalised axes); removed channels come out as zeros."""
    k = len(normalized_shape)
    shape = list(normalized_shape)
    shape[axis + k] = len(pos)
    sub = lambda t: None if t is None else t.index_select(axis + k, pos)
    y = F.layer_norm(x.index_select(axis, pos), shape, sub(weight),
                     sub(bias), eps)
    return x.new_zeros(x.shape).index_copy(axis % x.dim(), pos, y)


def masked_group_norm(x, num_groups, weight, bias, eps, pos):
    """Group norm (channels on axis 1) over the active channels only; every
    group keeps the same number of them (comb ties their positions)."""
    sub = lambda t: None if t is None else t.index_select(0, pos)
    y = F.group_norm(x.index_select(1, pos), num_groups, sub(weight),
                     sub(bias), eps)
    return x.new_zeros(x.shape).index_copy(1, pos, y)


class _ActiveChannels:
    """One norm op in the gated model: its channels along ``axis`` and,
    for the current mask, the positions of the active ones."""
    __slots__ = ('channels', 'axis', 'pos')

    def __init__(self, channels, axis):
        self.channels, self.axis, self.pos = channels, axis, None

    def update(self, kept_full, device):
        active = kept_full[np.where(self.channels >= 0, self.channels, -1)]
        self.pos = torch.as_tensor(np.nonzero(active)[0], device=device)


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


class _MaskedNorms(TorchFunctionMode):
    """Replaces the norm calls of one module call by masked versions;
    ``sites[i]`` is the :class:`_ActiveChannels` of the i-th norm call, or
    None."""

    def __init__(self, sites):
        super().__init__()
        self.sites, self.i = sites, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        layer = func in _LAYER_NORMS
        if not (layer or func in _GROUP_NORMS):
            return func(*args, **kwargs)
        site = self.sites[self.i] if self.i < len(self.sites) else None
        self.i += 1
        if site is None:
            return func(*args, **kwargs)
        x = args[0]
        pos = site.pos if site.pos.device == x.device else \
            site.pos.to(x.device)
        if layer:
            return masked_layer_norm(
                x, tuple(_arg(args, kwargs, 1, 'normalized_shape')),
                _arg(args, kwargs, 2, 'weight'), _arg(args, kwargs, 3, 'bias'),
                _arg(args, kwargs, 4, 'eps', 1e-5), pos, site.axis)
        return masked_group_norm(
            x, _arg(args, kwargs, 1, 'num_groups'),
            _arg(args, kwargs, 2, 'weight'), _arg(args, kwargs, 3, 'bias'),
            _arg(args, kwargs, 4, 'eps', 1e-5), pos)


def _norm_patch(m, name, comb, calls_sites, calls) -> GatePatch:
    """The gating forward of module ``name`` whose calls run the norm ops
    ``calls_sites`` (call -> op index -> :class:`NormSite`)."""
    n = max(calls_sites) + 1
    sites = []
    for c in range(n):
        ops = calls_sites.get(c, {})
        sites.append([None if i not in ops else
                      _ActiveChannels(comb.channels(ops[i].atoms),
                                      ops[i].axis)
                      for i in range(max(ops) + 1 if ops else 0)])
    flat = [s for call in sites for s in call if s]
    key = name + '#norm'
    plain = type(m).forward in (nn.LayerNorm.forward, nn.GroupNorm.forward)

    def make():
        if plain:  # the library's own forward: call the masked op
            layer = isinstance(m, nn.LayerNorm)

            def forward(self_, x):
                i = calls[key] % n
                calls[key] += 1
                site = sites[i][0]
                if layer:
                    return masked_layer_norm(
                        x, self_.normalized_shape, self_.weight,
                        self_.bias, self_.eps, site.pos, site.axis)
                return masked_group_norm(x, self_.num_groups,
                                         self_.weight, self_.bias,
                                         self_.eps, site.pos)
            return forward

        def forward(self_, *args, **kwargs):
            i = calls[key] % n
            calls[key] += 1
            with _MaskedNorms(sites[i]):
                return type(self_).forward(self_, *args, **kwargs)
        return forward

    def update(kept_full, device):
        for s in flat:
            s.update(kept_full, device)
    atoms = [s.atoms for ops in calls_sites.values() for s in ops.values()]
    return GatePatch(name, atoms, make, update)
