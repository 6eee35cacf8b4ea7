"""``nn.MultiheadAttention``: traced as one module, pruned into a decoupled
drop-in.

``nn.MultiheadAttention`` ties its q/k/v width to ``embed_dim``, the width of
its input and output, and derives the scale from it. The handler treats it
as three stop ops: the packed in-projection (producer of the q/k space, one
channel per head-dim position shared by q and k, and of the v space) and
``out_proj`` (producer of the output space, usually a residual stream).
Surgery swaps it for :class:`PrunedMultiheadAttention`, which has the same
parameter names and call signature but independent widths and the original
scale, so the model's code and pruned checkpoints keep working.

Query, key and value must carry the same channels (self-attention, also
with positional encodings added to some of them); cross-attention between
other channel spaces is frozen with a reason.
"""
import math
import types
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..space import TensorInfo
from .base import (CostTerm, ModuleHandler, ModuleRecord, input_atoms,
                   register_handler)


class PrunedMultiheadAttention(nn.Module):
    """Attention with decoupled widths, a drop-in for a pruned
    ``nn.MultiheadAttention`` whose query, key and value carry the same
    channels (same parameter names, same call signature, returns
    ``(output, None)``).

    Args:
        in_dim, out_dim: widths of the input and output.
        num_heads: heads; qk_dim and v_dim are per-head widths.
        scale: softmax scale (the original ``1/sqrt(head_dim)``).
        batch_first, dropout: as in ``nn.MultiheadAttention``.
        in_bias, out_bias: whether the projections have biases.
    """

    def __init__(self, in_dim, out_dim, num_heads, qk_dim, v_dim, scale,
                 batch_first=False, dropout=0.0, in_bias=True,
                 out_bias=True):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        rows = num_heads * (2 * qk_dim + v_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(rows, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(rows)) if in_bias \
            else None
        self.out_proj = nn.Linear(num_heads * v_dim, out_dim, bias=out_bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None,
                need_weights=False, attn_mask=None, **kwargs):
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:  # N, L, E
            query, key, value = (t.transpose(0, 1)
                                 for t in (query, key, value))
        B, L, _ = query.shape
        S = key.shape[1]
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        w = self.in_proj_weight.split([h * dq, h * dq, h * dv])
        b = self.in_proj_bias.split([h * dq, h * dq, h * dv]) \
            if self.in_proj_bias is not None else (None, ) * 3
        q = F.linear(query, w[0], b[0]).reshape(B, L, h, dq).transpose(1, 2)
        k = F.linear(key, w[1], b[1]).reshape(B, S, h, dq).transpose(1, 2)
        v = F.linear(value, w[2], b[2]).reshape(B, S, h, dv).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else \
                torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(
                    attn_mask, float('-inf'))
        if key_padding_mask is not None:
            kpm = torch.zeros(B, 1, 1, S, dtype=q.dtype, device=q.device)
            kpm = kpm.masked_fill(key_padding_mask.view(B, 1, 1, S),
                                  float('-inf'))
            mask = kpm if mask is None else mask + kpm
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, h * dv))
        return (out if self.batch_first else out.transpose(0, 1)), None


@dataclass
class AttentionRecord(ModuleRecord):
    heads: int = 1
    scale: float = 1.0
    tokens: int = 0
    batch_first: bool = False
    dropout: float = 0.0
    inputs: Optional[np.ndarray] = None
    qk: Optional[np.ndarray] = None     # head-dim j of every head (q and k)
    v: Optional[np.ndarray] = None
    outputs: Optional[np.ndarray] = None
    atom_fields = ('inputs', 'qk', 'v', 'outputs')

    @property
    def in_rows(self):
        return np.concatenate([self.qk, self.qk, self.v])


def _query_key_value(args, kwargs):
    names = ('query', 'key', 'value')
    return [kwargs.get(n, args[i] if len(args) > i else None)
            for i, n in enumerate(names)]


@register_handler
class MultiheadAttentionHandler(ModuleHandler):
    module_types = (nn.MultiheadAttention, )

    def trace(self, tr, name, m, args, kwargs, out):
        q, k, v = _query_key_value(args, kwargs)
        o = out[0] if isinstance(out, tuple) else out
        infos = [tr.info(t) for t in (q, k, v) if t is not None]
        ts = [t for t in (q, k, v) if t is not None]
        same = all(np.array_equal(i.ids, infos[0].ids) and
                   t.shape[-1] == q.shape[-1] for i, t in zip(infos, ts))
        if not same or not m._qkv_same_embed_dim or m.bias_k is not None:
            for i in infos:
                tr.freeze(i.ids, f'{name}: MultiheadAttention whose query, '
                          'key and value carry different channels (cross-'
                          'attention), separate k/v widths or bias_k')
            return TensorInfo(np.full((1, ) * o.dim(), -1), True)
        E, h = m.embed_dim, m.num_heads
        hd = E // h
        rec = tr.module_record(name, AttentionRecord)
        rec.merge(tr, inputs=input_atoms(tr, name, infos[0], -1, E),
                  qk=np.tile(tr.new_atoms(hd), h),
                  v=np.tile(tr.new_atoms(hd), h), outputs=tr.new_atoms(E))
        tokens = tr.per_sample(q.numel()) // max(E, 1)
        rec.heads, rec.scale = h, 1.0 / math.sqrt(hd)
        rec.tokens = max(rec.tokens, tokens)
        rec.batch_first, rec.dropout = m.batch_first, m.dropout
        tr.add_producer(name + '.in_proj', rec.in_rows,
                        torch.empty(tokens * 3 * E))
        tr.add_producer(name + '.out_proj', rec.outputs,
                        torch.empty(tokens * E))
        shape = [1] * o.dim()
        shape[-1] = E
        # the gated model masks in_proj/out_proj rows: outputs stay zero
        return TensorInfo(rec.outputs.reshape(shape), True)

    def internal_gates(self, m, rec):
        gates = [('in_proj_weight', 0, rec.in_rows),
                 ('out_proj.weight', 0, rec.outputs)]
        if m.in_proj_bias is not None:
            gates.append(('in_proj_bias', 0, rec.in_rows))
        if m.out_proj.bias is not None:
            gates.append(('out_proj.bias', 0, rec.outputs))
        return gates

    def gate_forward(self, m, rec, mask_of):
        from torch.nn.utils.stateless import _reparametrize_module

        in_rows, outputs = rec.in_rows, rec.outputs

        def forward(self_, *args, **kwargs):
            rows, out_rows = mask_of(in_rows), mask_of(outputs)
            params = {'in_proj_weight': self_.in_proj_weight * rows[:, None],
                      'out_proj.weight':
                      self_.out_proj.weight * out_rows[:, None]}
            if self_.in_proj_bias is not None:
                params['in_proj_bias'] = self_.in_proj_bias * rows
            if self_.out_proj.bias is not None:
                params['out_proj.bias'] = self_.out_proj.bias * out_rows
            with _reparametrize_module(self_, params):
                return type(self_).forward(self_, *args, **kwargs)
        return types.MethodType(forward, m)

    def cost_terms(self, m, rec):
        L = rec.tokens
        terms = [CostTerm('params', 1, (rec.in_rows, rec.inputs)),
                 CostTerm('params', 1, (rec.outputs, rec.v)),
                 CostTerm('flops', L, (rec.in_rows, rec.inputs)),
                 CostTerm('flops', L, (rec.outputs, rec.v)),
                 CostTerm('flops', L * L, (rec.qk, )),
                 CostTerm('flops', L * L, (rec.v, ))]
        if m.in_proj_bias is not None:
            terms.append(CostTerm('params', 1, (rec.in_rows, )))
        if m.out_proj.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def prune(self, m, rec, keep):
        kin, kqk, kv, kout = (keep(a) for a in (rec.inputs, rec.qk, rec.v,
                                                rec.outputs))
        h = rec.heads
        new = PrunedMultiheadAttention(
            int(kin.sum()), int(kout.sum()), h, int(kqk.sum()) // h,
            int(kv.sum()) // h, rec.scale, rec.batch_first, rec.dropout,
            in_bias=m.in_proj_bias is not None,
            out_bias=m.out_proj.bias is not None)
        dev = m.in_proj_weight.device
        r = torch.as_tensor(np.nonzero(np.concatenate([kqk, kqk, kv]))[0],
                            device=dev)
        c = torch.as_tensor(np.nonzero(kin)[0], device=dev)
        vo = torch.as_tensor(np.nonzero(kv)[0], device=dev)
        oo = torch.as_tensor(np.nonzero(kout)[0], device=dev)
        new.to(device=dev, dtype=m.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(m.in_proj_weight[r][:, c])
            new.out_proj.weight.copy_(m.out_proj.weight[oo][:, vo])
            if m.in_proj_bias is not None:
                new.in_proj_bias.copy_(m.in_proj_bias[r])
            if m.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias[oo])
        for pname, p in new.named_parameters():
            p.requires_grad_(m.get_parameter(pname).requires_grad)
        return new.train(m.training)
