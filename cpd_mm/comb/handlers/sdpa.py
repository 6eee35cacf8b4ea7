"""Fused scaled-dot-product attention (``F.scaled_dot_product_attention``).

It reaches the dispatcher as one op of the family listed in
:attr:`SDPAOps.ops` (flash / efficient / math variants differ between CPU,
CUDA and meta tensors). q and k are contracted per head: their head-dim
channels are one space; the output carries v's channels. Records:
:class:`AttentionScale` where the op derives ``1/sqrt(head_dim)`` from q
(surgery folds the original scale into q's producer when head dims shrink)
and :class:`AttentionCore` per call (heads and per-head widths, timed by the
latency table as the ``'attention'`` kind, :class:`AttentionLatency`).
Attention decomposed into matmul and softmax follows the generic rules
instead (and is not timed).
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..space import TensorInfo, along, channel_axis, collapse, empty_ids
from .base import LatencyKind, OpHandler, TimedLayer, register_op_handler


@dataclass
class AttentionScale:
    """``scaled_dot_product_attention`` without an explicit scale: it derives
    ``1/sqrt(head_dim)`` from q, so surgery folds the original scale into
    q's producer when head dims shrink."""
    module: str
    producer: Optional[str]
    q_ids: np.ndarray
    head_dim: int


@dataclass
class AttentionCore:
    """One ``scaled_dot_product_attention`` call inside ``module`` (its
    ``call``-th): per-head q/k and v channels (one head's atoms each)."""
    module: str
    call: int
    heads: int
    qk: np.ndarray
    v: np.ndarray


def _of(records, kind):
    return [r for r in records if isinstance(r, kind)]


class _AttentionCore(nn.Module):
    """Split of packed q/k/v, heads reshape, SDPA, merge: what sits between
    the qkv projection and the output projection of a ViT block."""

    def __init__(self, heads, qk, v, scale):
        super().__init__()
        self.heads, self.qk, self.v, self.scale = heads, qk, v, scale

    def forward(self, q_in, kv_in):
        h, dq, dv = self.heads, self.qk, self.v
        b, n, _ = q_in.shape
        m = kv_in.shape[1]
        k, v = kv_in.split([h * dq, h * dv], dim=-1)
        q = q_in.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, m, h, dq).transpose(1, 2)
        v = v.reshape(b, m, h, dv).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, h * dv)


class AttentionLatency(LatencyKind):
    """Fused attention calls in the latency table, at widths ``(heads,
    qk_dim, v_dim)``; keyed by the innermost module running the call."""
    kind = 'attention'
    function = F.scaled_dot_product_attention

    def spec(self, args, kwargs):
        names = ('query', 'key', 'value')
        q, k, v = [kwargs.get(n, args[i] if len(args) > i else None)
                   for i, n in enumerate(names)]
        heads = int(q.shape[-3]) if q.dim() >= 3 else 1
        batch = int(np.prod(q.shape[:-3])) if q.dim() > 3 else 1
        return dict(kind=self.kind, batch=batch, heads=heads,
                    tokens_q=int(q.shape[-2]), tokens_kv=int(k.shape[-2]),
                    qk=int(q.shape[-1]), v=int(v.shape[-1]))

    def widths_of(self, spec):
        return (spec['heads'], spec['qk'], spec['v'])

    def axes(self, spec, sample, samples, block):
        # up to 3 head counts and 4 per-head widths for qk and v
        return [sample(spec['heads'], 1, min(samples, 3), 10 ** 9),
                sample(spec['qk'], 1, min(samples, 4), block),
                sample(spec['v'], 1, min(samples, 4), block)]

    def build(self, spec, widths):
        h, dq, dv = widths
        b, n, m = spec['batch'], spec['tokens_q'], spec['tokens_kv']
        core = _AttentionCore(h, dq, dv, 1.0 / float(spec['qk']) ** 0.5)
        return core, [torch.randn(b, n, h * dq),
                      torch.randn(b, m, h * (dq + dv))]

    def output_size(self, spec, widths):
        h, _, dv = widths
        return spec['batch'] * spec['tokens_q'] * h * dv


@register_op_handler
class SDPAOps(OpHandler):
    key = 'sdpa'
    ops = ('scaled_dot_product_attention',
           '_scaled_dot_product_attention_math',
           '_scaled_dot_product_flash_attention_for_cpu',
           '_scaled_dot_product_flash_attention',
           '_scaled_dot_product_efficient_attention',
           '_scaled_dot_product_cudnn_attention')
    latency = AttentionLatency()

    def trace(self, tr, args, kwargs, out):
        q, k, v = args[:3]
        iq, ik, iv = tr.info(q), tr.info(k), tr.info(v)
        nd = q.dim()
        for i in (iq, ik):
            if channel_axis(tr.uf.find(i.ids)) not in (None, nd - 1):
                tr.freeze(i.ids, 'attention input with channels off the '
                          'last axis')
        shp = np.broadcast_shapes(iq.ids.shape[:-2] + (iq.ids.shape[-1], ),
                                  ik.ids.shape[:-2] + (ik.ids.shape[-1], ))
        tr.uf.union(np.broadcast_to(np.take(iq.ids, 0, axis=-2), shp),
                    np.broadcast_to(np.take(ik.ids, 0, axis=-2), shp))
        if not (iq.z or ik.z):
            tr.freeze(iq.ids, 'attention sums q/k channels not zero when '
                      'gated')
        if kwargs.get('scale', None) is None and iq.lin is None and \
                iq.has_ids:
            tr.freeze(iq.ids, 'attention with implicit scale on a q that is '
                      'not a pure view of a linear/conv output')
        elif kwargs.get('scale', None) is None:
            # the op derives 1/sqrt(head_dim) from q's width: surgery must
            # fold the original scale into q's producer when head_dim
            # shrinks
            tr.add_op_record(self, AttentionScale(
                tr.current_module, iq.lin, iq.ids, q.shape[-1]))
        if q.dim() >= 3:  # (..., heads, tokens, head_dim): for latency
            mod = tr.current_module
            calls = sum(1 for c in _of(tr.op_records[self.key],
                                       AttentionCore) if c.module == mod)
            tr.add_op_record(self, AttentionCore(
                mod, calls, int(q.shape[-3]), along(iq.ids, -1, q.shape[-1]),
                along(iv.ids, -1, v.shape[-1])))
        ids = iv.ids[..., :1, :] if iv.ids.shape[-2] > 1 else iv.ids
        info = TensorInfo(collapse(np.ascontiguousarray(ids)), iv.z)
        if isinstance(out, (tuple, list)):
            return [info] + [TensorInfo(empty_ids(t.dim()), True)
                             if isinstance(t, torch.Tensor) else None
                             for t in out[1:]]
        return info

    def annotate_groups(self, comb, records):
        for s in _of(records, AttentionScale):
            c = comb.channels(s.q_ids).ravel()
            c = c[c >= 0]
            for gi in np.unique(comb.group_of_channel[c]):
                heads = s.q_ids.size // max(s.head_dim, 1)
                comb.groups[gi].granularity = \
                    f'head dims (uniform over {heads} head(s))'

    def latency_layers(self, comb, records, table):
        out = []
        for core in _of(records, AttentionCore):
            key = core.module + (f'#{core.call}' if core.call else '')
            if key in table.attention_keys:
                out.append(TimedLayer(key, [core.qk, core.v], (core.heads, ),
                                      self.latency.kind))
        return out

    def prune(self, model, comb, records, keep):
        """An implicit scale derives 1/sqrt(head_dim) from q; keep the
        original by scaling q's producer."""
        for s in _of(records, AttentionScale):
            d = s.head_dim
            new_d = int(keep(along(s.q_ids, -1, d)).sum())
            if new_d == d or not s.producer:
                continue
            m = model.get_submodule(s.producer)
            rec = comb.records[s.producer]
            q_atoms = np.unique(s.q_ids[s.q_ids >= 0])
            rows = torch.as_tensor(
                np.nonzero(np.isin(rec.outputs, q_atoms))[0],
                device=m.weight.device)
            f = math.sqrt(new_d / d)
            for pname in ('weight', 'bias'):  # new tensors: m may share them
                p = getattr(m, pname, None)
                if p is None:
                    continue
                scaled = p.detach().clone()
                scaled[rows] *= f
                setattr(m, pname, nn.Parameter(
                    scaled, requires_grad=p.requires_grad))
