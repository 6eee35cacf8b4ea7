"""Spatial ops (pooling, interpolation, padding, rolling, flipping): they
act on positions, so channels pass if they are not on a moved axis."""
import numpy as np

from ..space import TensorInfo, canonical, channel_axis, empty_ids
from .table import RULES, classes_identical_along, is_tensor, rule


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
           if is_tensor(o) and o.dim() == x.dim() else None for o in outs]
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
           'reflection_pad1d', 'replication_pad1d', 'reflection_pad3d',
           'replication_pad3d', 'adaptive_max_pool1d', 'adaptive_max_pool3d',
           'avg_pool3d', 'fractional_max_pool2d', '_adaptive_avg_pool3d'):
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


def _dims(x, dims):
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % x.dim() for d in dims]


def _moves_channels(tr, x, dims, what):
    """Freeze if an op that moves positions acts on a channel axis."""
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is not None and ch in dims and \
            not classes_identical_along(tr, info.ids, ch):
        tr.freeze(info.ids, f'{what} on a channel axis')
    return info


@rule('roll')
def roll_rule(tr, args, kwargs, out):
    """Shifts positions (shifted windows): channels pass."""
    x = args[0]
    dims = args[2] if len(args) > 2 else kwargs.get('dims', [])
    info = _moves_channels(tr, x, _dims(x, dims) or list(range(x.dim())),
                           'roll')
    return TensorInfo(info.ids, info.z, info.src)


@rule('flip')
def flip_rule(tr, args, kwargs, out):
    x = args[0]
    info = _moves_channels(tr, x, _dims(x, args[1]), 'flip')
    return TensorInfo(info.ids, info.z, info.src)


@rule('fill_', 'zero_')
def fill_rule(tr, args, kwargs, out):
    """In place, every entry becomes one value: no channels are left."""
    zero = tr.current_op == 'zero_' or (
        len(args) > 1 and not is_tensor(args[1]) and args[1] == 0)
    return TensorInfo(empty_ids(args[0].dim()), zero, zero=zero)


@rule('index_select', 'gather')
def index_select_rule(tr, args, kwargs, out):
    """Picks positions along one axis: fine unless it is a channel axis."""
    x, dim = args[0], args[1] % max(args[0].dim(), 1)
    info = _moves_channels(tr, x, [dim], tr.current_op)
    ids = np.take(info.ids, [0], axis=dim) if info.ids.shape[dim] > 1 \
        else info.ids
    if tr.current_op == 'gather' and any(
            s > 1 and a != dim for a, s in enumerate(args[2].shape)
            if a < info.ids.ndim and info.ids.shape[a] > 1 and
            args[2].shape[a] != x.shape[a]):
        tr.freeze(info.ids, 'gather with an index narrower than the input')
    return TensorInfo(ids, info.z)


@rule('index')
def index_rule(tr, args, kwargs, out):
    """Advanced indexing ``x[..., idx, ...]`` on axes without channels
    (relative position tables, windows); adjacent indexed axes are replaced
    by the index shape in place."""
    x, indices = args[0], list(args[1])
    info = tr.info(x)
    dims = [d for d, i in enumerate(indices) if i is not None]
    adjacent = dims == list(range(dims[0], dims[0] + len(dims)))
    if not info.has_ids:
        src = {}
        if adjacent:  # a table indexed by positions keeps its other axes
            n_new = out.dim() - (x.dim() - len(dims))
            src = {n: m[:dims[0]] + (None, ) * n_new + m[dims[-1] + 1:]
                   for n, m in info.src.items()}
        return TensorInfo(empty_ids(out.dim()), info.z, src)
    _moves_channels(tr, x, dims, 'indexing')
    if not adjacent:
        tr.freeze(info.ids, 'indexing on non-adjacent axes')
        return TensorInfo(empty_ids(out.dim()), True)
    n_new = out.dim() - (x.dim() - len(dims))
    shape = list(info.ids.shape)
    new = shape[:dims[0]] + [1] * n_new + shape[dims[-1] + 1:]
    ids = info.ids[tuple(slice(0, 1) if d in dims else slice(None)
                         for d in range(x.dim()))].reshape(new)
    return TensorInfo(ids, info.z)


@rule('repeat')
def repeat_rule(tr, args, kwargs, out):
    x, reps = args[0], list(args[1])
    info = tr.info(x)
    lead = len(reps) - x.dim()
    ids = info.ids.reshape((1, ) * lead + info.ids.shape)
    ch = channel_axis(tr.uf.find(ids))
    if ch is not None and reps[ch] != 1:
        tr.freeze(info.ids, 'repeat along a channel axis')
        return TensorInfo(empty_ids(out.dim()), True)
    return TensorInfo(ids, info.z)


@rule('pixel_shuffle', 'pixel_unshuffle')
def pixel_shuffle_rule(tr, args, kwargs, out):
    """pixel_shuffle moves r*r channels into space: those r*r input channels
    are one output channel. pixel_unshuffle does the reverse."""
    x, r = args[0], int(args[1])
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is None:
        return TensorInfo(empty_ids(out.dim()), info.z)
    if ch != x.dim() - 3:
        tr.freeze(info.ids, f'{tr.current_op} with channels off axis -3')
        return TensorInfo(empty_ids(out.dim()), True)
    line = info.ids.reshape(-1)[:x.shape[ch]] if info.ids.size == \
        x.shape[ch] else None
    if line is None:
        tr.freeze(info.ids, f'{tr.current_op} on position-dependent channels')
        return TensorInfo(empty_ids(out.dim()), True)
    shape = [1] * out.dim()
    shape[ch] = out.shape[ch]
    if tr.current_op == 'pixel_shuffle':
        blocks = line.reshape(-1, r * r)
        canonical(blocks.T.copy(), tr.uf)  # unite within each block
        return TensorInfo(blocks[:, 0].reshape(shape), info.z)
    # unshuffle: every input channel becomes r*r output channels
    return TensorInfo(np.repeat(line, r * r).reshape(shape), info.z)


@rule('im2col')
def im2col_rule(tr, args, kwargs, out):
    """nn.Unfold: channel c becomes the k*k consecutive outputs
    c*k*k .. c*k*k + k*k - 1 (one channel for pruning)."""
    x = args[0]
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is None:
        return TensorInfo(empty_ids(out.dim()), info.z)
    k = out.shape[-2] // x.shape[ch]
    if ch != x.dim() - 3 or info.ids.size != x.shape[ch]:
        tr.freeze(info.ids, 'im2col with channels off axis -3')
        return TensorInfo(empty_ids(out.dim()), True)
    shape = [1] * out.dim()
    shape[-2] = out.shape[-2]
    return TensorInfo(np.repeat(info.ids.reshape(-1), k).reshape(shape),
                      info.z)


@rule('cumsum', 'cumprod', 'cummax', 'cummin', 'logcumsumexp')
def cumulative_rule(tr, args, kwargs, out):
    """Runs along one axis: fine unless it is a channel axis."""
    x = args[0]
    dim = (args[1] if len(args) > 1 else kwargs['dim']) % max(x.dim(), 1)
    info = _moves_channels(tr, x, [dim], tr.current_op)
    res = TensorInfo(info.ids, info.z and tr.current_op == 'cumsum')
    return [res, None] if isinstance(out, (tuple, list)) else res
