"""How each aten op moves channel atoms: the rule table of the tracer.

A rule receives the tracer, the op's positional args and kwargs and its
output, and returns the :class:`TensorInfo` of the output (or a list for ops
returning several tensors).  Ops without a rule are handled conservatively by
the tracer: every channel they touch is frozen, and the reason is recorded.
"""
import numpy as np
import torch

from .space import TensorInfo, canonical, channel_axis, collapse, empty_ids

# op-name -> rule; names are aten overload packets ("add", "view", ...)
RULES = {}

# Unary ops that map 0 to 0, so removed channels stay zero in the gated model.
ZERO_PRESERVING = {
    'relu', 'relu_', 'gelu', 'gelu_', 'silu', 'silu_', 'hardswish',
    'hardswish_', 'leaky_relu', 'leaky_relu_', 'elu', 'elu_', 'tanh', 'neg',
    'abs', 'sqrt', 'hardtanh', 'hardtanh_', 'clone', 'contiguous', 'detach',
    'alias', '_to_copy', 'to', 'lift_fresh', 'dropout', 'native_dropout',
    'mish', 'mish_', 'sin', 'erf', 'sign', 'lift_fresh_copy', 'clamp_min',
    'clamp_min_', 'threshold', 'prelu', 'celu', 'selu', 'fill_',
}
# Unary elementwise ops that keep channels in place but not zeros.
NON_ZERO_UNARY = {
    'sigmoid', 'sigmoid_', 'hardsigmoid', 'hardsigmoid_', 'exp', 'exp_',
    'cos', 'log', 'reciprocal', 'rsqrt', 'softplus', 'log_sigmoid_forward',
    'clamp', 'clamp_', 'square', 'bitwise_not', 'logical_not', 'isnan',
}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def _t(x):
    return isinstance(x, torch.Tensor)


def _classes_identical_along(tr, ids, axis):
    if ids.shape[axis] == 1:
        return True
    cls = tr.uf.find(ids)
    first = np.take(cls, [0], axis=axis)
    return bool((cls == first).all())


# ----------------------------------------------------------------- unary ops
def unary(tr, args, kwargs, out, name):
    info = tr.info(args[0])
    z = info.z if name in ZERO_PRESERVING else not info.has_ids
    if name in ('clamp', 'clamp_', 'hardtanh', 'hardtanh_'):
        lo = args[1] if len(args) > 1 else kwargs.get('min', None)
        hi = args[2] if len(args) > 2 else kwargs.get('max', None)
        ok = (lo is None or lo <= 0) and (hi is None or hi >= 0)
        z = info.z and ok
    return TensorInfo(info.ids, z, info.src,
                      info.lin if name in ('clone', 'contiguous', 'detach',
                                           'alias', '_to_copy') else None)


for _n in ZERO_PRESERVING | NON_ZERO_UNARY:
    RULES[_n] = (lambda n: (lambda tr, a, k, o: unary(tr, a, k, o, n)))(_n)


# ------------------------------------------------------------ elementwise
def _aligned(info, ndim):
    ids = info.ids.reshape((1, ) * (ndim - info.ids.ndim) + info.ids.shape)
    src = {n: (None, ) * (ndim - len(m)) + m for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin)


def elementwise(tr, operands, out, kind):
    """Broadcasting op over several tensors (kind: 'add', 'mul', 'div'...)."""
    nd = out.dim() if _t(out) else max(o.dim() for o in operands if _t(o))
    infos = [_aligned(tr.info(o), nd) if _t(o) else None for o in operands]
    carriers = [i for i in infos if i is not None and i.has_ids]
    if not carriers:
        src = {}
        for i in infos:
            if i is not None:
                src.update(i.src)
        zs = [i.z for i in infos if i is not None]
        return TensorInfo(empty_ids(nd), all(zs) if zs else True, src)
    shape = np.broadcast_shapes(*[c.ids.shape for c in carriers])
    ids = np.broadcast_to(carriers[0].ids, shape)
    for c in carriers[1:]:
        other = np.broadcast_to(c.ids, shape)
        tr.uf.union(ids, other)
        ids = np.where(ids >= 0, ids, other)
    ids = canonical(np.ascontiguousarray(ids), tr.uf)
    ch = channel_axis(ids)
    zs = []
    for o, i in zip(operands, infos):
        if i is None:  # python scalar
            zs.append(kind in ('mul', 'div') or o == 0)
            continue
        if not i.has_ids:
            width = o.shape[ch - (nd - o.dim())] \
                if ch is not None and ch - (nd - o.dim()) >= 0 else 1
            if width > 1:
                tr.attach(i, ids, ch, out.shape[ch], kind)
            zs.append(False)
        else:
            zs.append(i.z)
    if kind == 'mul':
        z = any(zs)
    elif kind == 'div':
        z = zs[0]
    else:
        z = all(zs)
    return TensorInfo(ids, z)


def _binary(kind):
    def fn(tr, args, kwargs, out):
        ops = [a for a in args[:2]]
        if 'other' in kwargs:
            ops.append(kwargs['other'])
        return elementwise(tr, ops, out, kind)
    return fn


for _n in ('add', 'add_', 'sub', 'sub_', 'rsub', 'maximum', 'minimum',
           'lerp', 'addcmul', 'masked_fill', 'masked_fill_', 'fmod', 'eq', 'ne', 'gt', 'lt', 'ge', 'le'):
    RULES[_n] = _binary('add')
for _n in ('mul', 'mul_', 'bitwise_and', 'logical_and'):
    RULES[_n] = _binary('mul')
for _n in ('div', 'div_', 'true_divide', 'floor_divide'):
    RULES[_n] = _binary('div')
RULES['pow'] = _binary('div')  # x**p keeps zeros of x (p > 0 in practice)


@rule('where')
def where_rule(tr, args, kwargs, out):
    return elementwise(tr, list(args[1:3]), out, 'add')


@rule('copy_')
def copy_rule(tr, args, kwargs, out):
    return tr.info(args[1]) if _t(args[1]) else tr.info(args[0])


# ------------------------------------------------------------- reductions
@rule('mean', 'sum', 'amax', 'amin', 'max', 'min', 'var', 'std', 'norm',
      'logsumexp', 'prod', 'var_mean', 'std_mean', 'linalg_vector_norm')
def reduce_rule(tr, args, kwargs, out):
    x = args[0]
    info = tr.info(x)
    dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) \
        else kwargs.get('dim', None)
    if tr.current_op in ('norm', 'linalg_vector_norm', 'std', 'var'):
        dims = kwargs.get('dim', args[2] if len(args) > 2 else None)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        dims = list(range(x.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % x.dim() for d in dims]
    for d in dims:
        if not _classes_identical_along(tr, info.ids, d):
            tr.freeze(info.ids, f'{tr.current_op} reduces over a channel axis')
    outs = out if isinstance(out, (tuple, list)) else [out]
    res = []
    for o in outs:
        if not _t(o):
            res.append(None)
            continue
        ids = info.ids
        for d in sorted(dims, reverse=True):
            ids = np.take(ids, [0], axis=d)
        if o.dim() != x.dim():  # keepdim=False
            ids = ids.reshape([ids.shape[a] for a in range(x.dim())
                               if a not in dims])
        res.append(TensorInfo(ids, info.z and tr.current_op not in (
            'amin', 'min', 'var', 'std', 'logsumexp', 'prod')))
    return res if isinstance(out, (tuple, list)) else res[0]


@rule('_softmax', 'softmax', '_log_softmax', 'log_softmax')
def softmax_rule(tr, args, kwargs, out):
    info = tr.info(args[0])
    dim = args[1] % args[0].dim()
    if not _classes_identical_along(tr, info.ids, dim):
        tr.freeze(info.ids, 'softmax over a channel axis')
    return TensorInfo(info.ids, not info.has_ids)


# ------------------------------------------- spatial ops (channel axis 1)
def spatial(tr, args, kwargs, out):
    x = args[0]
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is not None and ch >= 2:
        tr.freeze(info.ids, f'{tr.current_op} works on a channel axis')
    outs = out if isinstance(out, (tuple, list)) else [out]
    # batch and channel axes pass through (so do parameter axes behind them,
    # e.g. an interpolated positional embedding); spatial axes are mixed
    src = {n: tuple(m[a] if a < 2 else None for a in range(len(m)))
           for n, m in info.src.items()}
    res = [TensorInfo(info.ids[tuple(slice(0, 1) if a >= 2 else slice(None)
                                     for a in range(x.dim()))], info.z, src)
           if _t(o) and o.dim() == x.dim() else None for o in outs]
    return res if isinstance(out, (tuple, list)) else res[0]


for _n in ('max_pool1d', 'max_pool2d', 'max_pool3d',
           'max_pool2d_with_indices', 'max_pool3d_with_indices',
           'avg_pool1d', 'avg_pool2d', 'avg_pool3d', 'adaptive_avg_pool1d',
           'adaptive_avg_pool2d', '_adaptive_avg_pool2d',
           'adaptive_avg_pool3d', '_adaptive_avg_pool3d',
           'adaptive_max_pool2d', 'upsample_nearest1d', 'upsample_nearest2d',
           'upsample_nearest3d', 'upsample_linear1d', 'upsample_bilinear2d',
           'upsample_bicubic2d', '_upsample_bilinear2d_aa',
           '_upsample_bicubic2d_aa', '_upsample_nearest_exact2d',
           'upsample_trilinear3d', 'reflection_pad2d', 'replication_pad2d',
           'reflection_pad1d', 'replication_pad1d', 'pixel_unshuffle_not'):
    RULES[_n] = spatial


@rule('constant_pad_nd', 'pad')
def pad_rule(tr, args, kwargs, out):
    x, pad = args[0], list(args[1])
    info = tr.info(x)
    padded = [x.dim() - 1 - i // 2 for i in range(len(pad)) if pad[i]]
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is not None and ch in padded:
        tr.freeze(info.ids, 'padding on a channel axis')
    ids = info.ids
    for a in padded:
        ids = np.take(ids, [0], axis=a)
    value = args[2] if len(args) > 2 else 0
    return TensorInfo(ids, info.z and not value)


# ------------------------------------------------------ matmul / attention
@rule('bmm', 'mm', 'matmul')
def matmul_rule(tr, args, kwargs, out):
    a, b = args[0], args[1]
    if tr.is_param_like(a) or tr.is_param_like(b):
        return None  # functional linear with a weight: unknown stop op
    ia, ib = tr.info(a), tr.info(b)
    nd = max(a.dim(), b.dim())
    A, B = _aligned(ia, nd).ids, _aligned(ib, nd).ids
    ka = np.take(A, [0], axis=nd - 2)  # contraction: a[..., k], b[..., k, :]
    kb = np.swapaxes(np.take(B, [0], axis=nd - 1), -1, -2)
    a_ch, b_ch = channel_axis(tr.uf.find(A)), channel_axis(tr.uf.find(B))
    if (a_ch == nd - 1 or b_ch == nd - 2) and (ia.has_ids or ib.has_ids):
        shp = np.broadcast_shapes(ka.shape, kb.shape)
        tr.uf.union(np.broadcast_to(ka, shp), np.broadcast_to(kb, shp))
        if not (ia.z or ib.z):
            tr.freeze(np.concatenate([ka.ravel(), kb.ravel()]),
                      'matmul sums channels that are not zero when gated')
    # output channels come from an operand whose channels are not contracted
    res = empty_ids(out.dim())
    z = True
    if b_ch is not None and b_ch != nd - 2:
        res = np.take(B, [0], axis=nd - 2)
        z = ib.z
    elif a_ch is not None and a_ch != nd - 1:
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
        tr.record_sdpa(q, iq)
    ids = iv.ids[..., :1, :] if iv.ids.shape[-2] > 1 else iv.ids
    info = TensorInfo(collapse(np.ascontiguousarray(ids)), iv.z)
    if isinstance(out, (tuple, list)):
        return [info] + [TensorInfo(empty_ids(t.dim()), True) if _t(t)
                         else None for t in out[1:]]
    return info


# view, indexing and joining rules live in their own file
from . import views  # noqa: E402,F401
