"""Elementwise ops, reductions and softmax: how they move channel atoms
and whether removed channels stay zero in the gated model (``z``)."""
import numpy as np

from ..space import TensorInfo, along, canonical, channel_axis, empty_ids
from .table import (RULES, aligned, classes_identical_along, is_tensor,
                    rule)

# Unary ops that map 0 to 0, so removed channels stay zero in the gated model.
ZERO_PRESERVING = {
    'relu', 'relu_', 'gelu', 'gelu_', 'silu', 'silu_', 'hardswish',
    'hardswish_', 'leaky_relu', 'leaky_relu_', 'elu', 'elu_', 'tanh', 'neg',
    'abs', 'sqrt', 'hardtanh', 'hardtanh_', 'clone', 'contiguous', 'detach',
    'alias', '_to_copy', 'to', 'dropout', 'native_dropout', 'mish', 'mish_',
    'sin', 'erf', 'sign', 'lift_fresh_copy', 'clamp_min', 'clamp_min_',
    'threshold', 'celu', 'selu', 'softshrink', 'hardshrink', 'tan', 'asinh',
    'atan', 'sinh', 'expm1', 'log1p', 'round', 'trunc', 'floor', 'ceil',
    'relu6', 'hardtanh', '_conj', 'conj', 'positive', 'nan_to_num',
}
# Unary elementwise ops that keep channels in place but not zeros.
NON_ZERO_UNARY = {
    'sigmoid', 'sigmoid_', 'hardsigmoid', 'hardsigmoid_', 'exp', 'exp_',
    'cos', 'log', 'reciprocal', 'rsqrt', 'softplus', 'log_sigmoid_forward',
    'clamp', 'clamp_', 'square', 'bitwise_not', 'logical_not', 'isnan',
    'isinf', 'isfinite', 'log_sigmoid', 'cosh', 'log2', 'log10', 'frac',
    'softsign', 'reciprocal_', 'rsqrt_', 'exp2', 'erfc',
}


# ----------------------------------------------------------------- unary ops
def _is_number(x):
    return isinstance(x, (int, float))


def unary(tr, args, kwargs, out, name):
    info = tr.info(args[0])
    z = info.z if name in ZERO_PRESERVING else not info.has_ids
    if name in ('clamp', 'clamp_', 'hardtanh', 'hardtanh_', 'clamp_min',
                'clamp_min_'):
        lo = args[1] if len(args) > 1 else kwargs.get('min', None)
        hi = args[2] if len(args) > 2 else kwargs.get('max', None)
        if name.startswith('clamp_min'):
            hi = None
        ok = (not _is_number(lo) or lo <= 0) and (not _is_number(hi)
                                                  or hi >= 0)
        z = info.z and ok and not (is_tensor(lo) or is_tensor(hi))
    elif name == 'threshold':  # y = x if x > t else v
        z = info.z and (args[2] == 0 or args[1] < 0)
    elif name == 'nan_to_num':
        z = info.z
    return TensorInfo(info.ids, z, info.src,
                      info.lin if name in ('clone', 'contiguous', 'detach',
                                           'alias', '_to_copy') else None)


for _n in ZERO_PRESERVING | NON_ZERO_UNARY:
    RULES[_n] = (lambda n: (lambda tr, a, k, o: unary(tr, a, k, o, n)))(_n)


@rule('prelu', '_prelu_kernel')
def prelu_rule(tr, args, kwargs, out):
    """PReLU: a per-channel slope (on axis 1) is a passenger. ``prelu``
    takes the slope as ``[C]``; ``nn.PReLU`` reaches ``_prelu_kernel``
    with it viewed to ``[1, C, 1, 1]``, which broadcasts against x."""
    x, w = args[0], args[1]
    info = tr.info(x)
    if w.numel() > 1 and info.has_ids:
        wi = tr.info(w)
        if w.dim() > 1:  # the slope's axis that meets x's axis 1
            wi, axis = aligned(wi, x.dim()), 1
        else:
            axis = 0
        tr.attach_line(wi, along(info.ids, 1, x.shape[1]), axis, 'prelu')
    return TensorInfo(info.ids, info.z)


# ------------------------------------------------------------ elementwise
def elementwise(tr, operands, out, kind):
    """Broadcasting op over several tensors (kind: 'add', 'mul', 'div'...)."""
    nd = out.dim() if is_tensor(out) else \
        max(o.dim() for o in operands if is_tensor(o))
    infos = [aligned(tr.info(o), nd) if is_tensor(o) else None
             for o in operands]
    carriers = [i for i in infos if i is not None and i.has_ids]
    zeros = [o == 0 if i is None else i.zero for o, i in zip(operands, infos)]
    if not carriers:
        src = {}
        for i in infos:
            if i is not None:
                src.update(i.src)
        zs = [i.z for i in infos if i is not None]
        zero = any(zeros) if kind == 'mul' else \
            zeros[0] if kind == 'div' else all(zeros)
        return TensorInfo(empty_ids(nd), all(zs) if zs else True, src,
                          zero=zero)
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
        if i.zero and not i.has_ids:  # adding zeros keeps zeros
            zs.append(True)
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
    return tr.info(args[1]) if is_tensor(args[1]) else tr.info(args[0])


# ------------------------------------------------------------- reductions
@rule('mean', 'sum', 'amax', 'amin', 'max', 'min', 'var', 'std', 'norm',
      'logsumexp', 'prod', 'var_mean', 'std_mean', 'linalg_vector_norm')
def reduce_rule(tr, args, kwargs, out):
    x = args[0]
    info = tr.info(x)
    dims = args[1] if len(args) > 1 and not isinstance(args[1], bool) \
        else kwargs.get('dim', None)
    if tr.current_op in ('norm', 'linalg_vector_norm'):  # (x, p, dim)
        dims = kwargs.get('dim', args[2] if len(args) > 2 else None)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        dims = list(range(x.dim()))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [d % x.dim() for d in dims]
    # a sum or a norm over channels that are zero when removed is exact:
    # zeros add nothing (a mean, max or variance would change)
    exact = info.z and tr.current_op in ('sum', 'norm', 'linalg_vector_norm')
    for d in dims:
        if not exact and not classes_identical_along(tr, info.ids, d):
            tr.freeze(info.ids, f'{tr.current_op} reduces over a channel axis')
    outs = out if isinstance(out, (tuple, list)) else [out]
    res = []
    for o in outs:
        if not is_tensor(o):
            res.append(None)
            continue
        ids = info.ids
        if any(ids.shape[d] > 1 for d in dims):  # the channel axis goes
            ids = np.full(ids.shape, -1, dtype=np.int64)
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
    if not classes_identical_along(tr, info.ids, dim):
        tr.freeze(info.ids, 'softmax over a channel axis')
    return TensorInfo(info.ids, not info.has_ids)


