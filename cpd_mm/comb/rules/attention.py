"""Products of activations: matmul between two activations couples the
contracted channels (q.k^T couples q and k; attn.v carries v), and fused
scaled-dot-product attention."""
import numpy as np

from ..records import AttentionCore, AttentionScale
from ..space import TensorInfo, along, channel_axis, collapse, empty_ids
from .table import aligned, is_tensor, rule


# ------------------------------------------------------ matmul / attention
@rule('bmm', 'mm', 'matmul')
def matmul_rule(tr, args, kwargs, out):
    a, b = args[0], args[1]
    # a parameter operand (a functional linear's weight, a position table)
    # is a passenger of the channels it is contracted with; its other axis
    # gives channels that stay
    ia, ib = tr.info(a), tr.info(b)
    nd = max(a.dim(), b.dim())
    A, B = aligned(ia, nd).ids, aligned(ib, nd).ids
    ka = np.take(A, [0], axis=nd - 2)  # contraction: a[..., k], b[..., k, :]
    kb = np.swapaxes(np.take(B, [0], axis=nd - 1), -1, -2)
    a_ch, b_ch = channel_axis(tr.uf.find(A)), channel_axis(tr.uf.find(B))
    K = a.shape[-1]
    if (a_ch == nd - 1) != (b_ch == nd - 2) and K > 1:
        # channels meet a fixed-width operand (a table, a derived weight):
        # its rows must go with them, or the channels stay
        ch_info, other, oax = (ia, ib, b.dim() - 2) if a_ch == nd - 1 \
            else (ib, ia, a.dim() - 1)
        line = along(ch_info.ids, -1 if a_ch == nd - 1 else -2, K)
        tr.attach_line(other, line, oax, 'matmul')
        if not ch_info.z:
            tr.freeze(line, 'matmul sums channels that are not zero when '
                      'gated')
    elif a_ch == nd - 1 or b_ch == nd - 2:
        shp = np.broadcast_shapes(ka.shape, kb.shape)
        tr.uf.union(np.broadcast_to(ka, shp), np.broadcast_to(kb, shp))
        if not (ia.z or ib.z):
            tr.freeze(np.concatenate([ka.ravel(), kb.ravel()]),
                      'matmul sums channels that are not zero when gated')
    # output channels come from an operand whose channels are not contracted
    a_kept = a_ch is not None and a_ch != nd - 1
    b_kept = b_ch is not None and b_ch != nd - 2
    if a_kept and b_kept:
        if a_ch == b_ch and a_ch < nd - 2:
            # the same batch axis (heads): the pairs go together
            pa = np.take(np.take(A, [0], axis=nd - 1), [0], axis=nd - 2)
            pb = np.take(np.take(B, [0], axis=nd - 1), [0], axis=nd - 2)
            shp = np.broadcast_shapes(pa.shape, pb.shape)
            tr.uf.union(np.broadcast_to(pa, shp), np.broadcast_to(pb, shp))
        else:
            # a's rows and b's columns both carry channels: the product
            # would vary along two axes (e.g. per-class regions times
            # features, OCR's object context); a's stay
            tr.freeze(A, 'matmul keeps channels of both operands on '
                      'different axes')
    res = empty_ids(out.dim())
    z = True
    if b_kept:
        res = np.take(B, [0], axis=nd - 2)
        z = ib.z
    elif a_kept:
        res = np.take(A, [0], axis=nd - 1)
        z = ia.z
    res = res.reshape(res.shape[-out.dim():]) if res.ndim > out.dim() else res
    return TensorInfo(collapse(res), z)


@rule('scaled_dot_product_attention', '_scaled_dot_product_attention_math',
      '_scaled_dot_product_flash_attention_for_cpu',
      '_scaled_dot_product_flash_attention',
      '_scaled_dot_product_efficient_attention',
      '_scaled_dot_product_cudnn_attention')
def sdpa_rule(tr, args, kwargs, out):
    q, k, v = args[:3]
    iq, ik, iv = tr.info(q), tr.info(k), tr.info(v)
    nd = q.dim()
    for i in (iq, ik):
        if channel_axis(tr.uf.find(i.ids)) not in (None, nd - 1):
            tr.freeze(i.ids, 'attention input with channels off the last axis')
    shp = np.broadcast_shapes(iq.ids.shape[:-2] + (iq.ids.shape[-1], ),
                              ik.ids.shape[:-2] + (ik.ids.shape[-1], ))
    tr.uf.union(np.broadcast_to(np.take(iq.ids, 0, axis=-2), shp),
                np.broadcast_to(np.take(ik.ids, 0, axis=-2), shp))
    if not (iq.z or ik.z):
        tr.freeze(iq.ids, 'attention sums q/k channels not zero when gated')
    if kwargs.get('scale', None) is None and iq.lin is None and iq.has_ids:
        tr.freeze(iq.ids, 'attention with implicit scale on a q that is not '
                  'a pure view of a linear/conv output')
    elif kwargs.get('scale', None) is None:
        # the op derives 1/sqrt(head_dim) from q's width: surgery must fold
        # the original scale into q's producer when head_dim shrinks
        tr.attention_scales.append(AttentionScale(
            tr.current_module, iq.lin, iq.ids, q.shape[-1]))
    if q.dim() >= 3:  # (..., heads, tokens, head_dim): for the cost models
        mod = tr.current_module
        calls = sum(1 for c in tr.attention_cores if c.module == mod)
        tr.attention_cores.append(AttentionCore(
            mod, calls, int(q.shape[-3]), along(iq.ids, -1, q.shape[-1]),
            along(iv.ids, -1, v.shape[-1])))
    ids = iv.ids[..., :1, :] if iv.ids.shape[-2] > 1 else iv.ids
    info = TensorInfo(collapse(np.ascontiguousarray(ids)), iv.z)
    if isinstance(out, (tuple, list)):
        return [info] + [TensorInfo(empty_ids(t.dim()), True) if is_tensor(t)
                         else None for t in out[1:]]
    return info
