"""Products of activations: matmul between two activations couples the
contracted channels (q.k^T couples q and k; attn.v carries v). Fused
attention is a construct of its own (:mod:`cpd_mm.comb.handlers.sdpa`)."""
import numpy as np

from ..space import TensorInfo, along, channel_axis, collapse, empty_ids
from .table import aligned, rule


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
