"""nn.MultiheadAttention: traced as one stop op, pruned into a decoupled one.

``nn.MultiheadAttention`` ties its q/k/v width to ``embed_dim``, the width of
its input and output, and derives the scale from it.  As a handled module it
is three stop ops: the packed in-projection (producer of the q/k space, one
channel per head-dim position shared by q and k, and of the v space), and
``out_proj`` (producer of the output space, usually a residual stream).
Surgery swaps it for :class:`PrunedMultiheadAttention`, which has the same
parameter names and call signature but independent widths and the original
scale, so the model's code and pruned checkpoints keep working.

Only self-attention (query, key and value carry the same channels) is
handled; anything else is frozen with a reason.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .space import TensorInfo


class PrunedMultiheadAttention(nn.Module):
    """Self-attention with decoupled widths, a drop-in for a pruned
    ``nn.MultiheadAttention`` (same parameter names, same call signature,
    returns ``(output, None)``).

    Args:
        in_dim, out_dim: widths of the input and output.
        num_heads: heads; qk_dim and v_dim are per-head widths.
        scale: softmax scale (the original ``1/sqrt(head_dim)``).
        batch_first, dropout: as in ``nn.MultiheadAttention``.
    """

    def __init__(self, in_dim, out_dim, num_heads, qk_dim, v_dim, scale,
                 batch_first=False, dropout=0.0, bias=True):
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        rows = num_heads * (2 * qk_dim + v_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(rows, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(rows)) if bias else None
        self.out_proj = nn.Linear(num_heads * v_dim, out_dim, bias=bias)

    def forward(self, query, key=None, value=None, key_padding_mask=None,
                need_weights=False, attn_mask=None, **kwargs):
        x = query if self.batch_first else query.transpose(0, 1)  # N, L, E
        B, L, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(B, L, h, dq).transpose(1, 2)
        k = k.reshape(B, L, h, dq).transpose(1, 2)
        v = v.reshape(B, L, h, dv).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dtype != torch.bool else \
                torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(
                    attn_mask, float('-inf'))
        if key_padding_mask is not None:
            kpm = torch.zeros(B, 1, 1, L, dtype=q.dtype, device=q.device)
            kpm = kpm.masked_fill(key_padding_mask.view(B, 1, 1, L),
                                  float('-inf'))
            mask = kpm if mask is None else mask + kpm
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, h * dv))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _self_attention(tr, args, kwargs):
    names = ('query', 'key', 'value')
    ts = [kwargs.get(n, args[i] if len(args) > i else None)
          for i, n in enumerate(names)]
    q = ts[0]
    infos = [tr.info(t) for t in ts if t is not None]
    same = all(np.array_equal(i.ids, infos[0].ids) and t.shape == q.shape
               for i, t in zip(infos, ts))
    return q, infos[0], same


class MultiheadAttentionHandler:
    kind = 'mha'

    @staticmethod
    def trace(tr, name, m, info, x, out):
        args, kwargs = x
        q, qinfo, same = _self_attention(tr, args, kwargs)
        if not same or not m._qkv_same_embed_dim or m.bias_k is not None:
            for t in tr.tensors_of((args, kwargs)):
                tr.freeze(tr.info(t).ids, f'{name}: MultiheadAttention other '
                          'than plain self-attention is not prunable')
            return TensorInfo(np.full((1, ) * out.dim(), -1), True)
        from .modules import _input_atoms
        E, h = m.embed_dim, m.num_heads
        hd = E // h
        rec = tr.module_record(name, 'mha')
        ins = _input_atoms(tr, name, qinfo, -1, E)
        qk = np.tile(tr.new_atoms(hd), h)       # head-dim j of every head
        v = np.tile(tr.new_atoms(hd), h)
        o = tr.new_atoms(E)
        for key, val in (('in', ins), ('qk', qk), ('v', v), ('out', o)):
            if key in rec:
                tr.uf.union(rec[key], val)
            else:
                rec[key] = val
        tokens = q.numel() // max(q.shape[-1], 1)
        rec.update(heads=h, scale=1.0 / math.sqrt(hd), tokens=tokens,
                   batch_first=m.batch_first, dropout=m.dropout)
        inner = np.concatenate([rec['qk'], rec['qk'], rec['v']])
        tr.add_producer(name + '.in_proj', inner, torch.empty(tokens * 3 * E))
        tr.add_producer(name + '.out_proj', rec['out'],
                        torch.empty(tokens * E))
        shape = [1] * out.dim()
        shape[-1] = E
        # the gated model masks in_proj/out_proj rows: outputs stay zero
        return TensorInfo(rec['out'].reshape(shape), True)

    @staticmethod
    def prune(m, rec, keep):
        raise RuntimeError('MultiheadAttention is replaced, not sliced')


def replace_pruned_attention(model, name, rec, keep):
    """Swap ``model.<name>`` for a :class:`PrunedMultiheadAttention`."""
    m = model.get_submodule(name)
    kin, kqk, kv, kout = (keep(rec[k]) for k in ('in', 'qk', 'v', 'out'))
    h = rec['heads']
    rows = np.concatenate([kqk, kqk, kv])  # q, k, v blocks of in_proj
    new = PrunedMultiheadAttention(
        int(kin.sum()), int(kout.sum()), h, int(kqk.sum()) // h,
        int(kv.sum()) // h, rec['scale'], rec['batch_first'], rec['dropout'],
        bias=m.in_proj_bias is not None)
    r = torch.as_tensor(np.nonzero(rows)[0])
    c = torch.as_tensor(np.nonzero(kin)[0])
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight[r][:, c])
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(m.in_proj_bias[r])
        vo = torch.as_tensor(np.nonzero(kv)[0])
        oo = torch.as_tensor(np.nonzero(kout)[0])
        new.out_proj.weight.copy_(m.out_proj.weight[oo][:, vo])
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias[oo])
    new.to(m.in_proj_weight.device).train(m.training)
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def masked_attention_params(m, rec, mask_of):
    """In-projection and out-projection with removed rows zeroed (gating)."""
    rows = torch.cat([mask_of(rec['qk']), mask_of(rec['qk']),
                      mask_of(rec['v'])])
    out_rows = mask_of(rec['out'])
    params = {'in_proj_weight': m.in_proj_weight * rows[:, None],
              'out_proj.weight': m.out_proj.weight * out_rows[:, None]}
    if m.in_proj_bias is not None:
        params['in_proj_bias'] = m.in_proj_bias * rows
    if m.out_proj.bias is not None:
        params['out_proj.bias'] = m.out_proj.bias * out_rows
    return params
