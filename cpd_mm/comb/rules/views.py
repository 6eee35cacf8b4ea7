"""How view, indexing and joining ops move channel atoms (reshape, permute,
select/slice, split/chunk/unbind, cat/stack)."""
import numpy as np

from ..records import SplitSizes
from ..space import TensorInfo, along, canonical, channel_axis, empty_ids
from .table import classes_identical_along, rule

VIEW_OPS = {'view', '_unsafe_view', 'reshape', 'flatten', 'unflatten'}


# --------------------------------------------------------------- view ops
def reshape_groups(src, dst):
    """Pair contiguous runs of axes whose sizes multiply to the same value."""
    groups, i, j = [], 0, 0
    while i < len(src) and j < len(dst):
        gi, gj, ps, pd = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                gi.append(i)
                ps *= src[i]
                i += 1
            else:
                gj.append(j)
                pd *= dst[j]
                j += 1
        groups.append((gi, gj))
    for k in range(i, len(src)):
        groups[-1][0].append(k) if groups else groups.append(([k], []))
    for k in range(j, len(dst)):
        groups[-1][1].append(k) if groups else groups.append(([], [k]))
    return groups


def reshape_ids(ids, src_shape, dst_shape):
    src_shape, dst_shape = list(src_shape), list(dst_shape)
    if 0 in src_shape or not ids.ndim:
        return empty_ids(len(dst_shape)) if (ids < 0).all() else \
            np.broadcast_to(ids, src_shape).reshape(dst_shape)
    inter, outs = [], [1] * len(dst_shape)
    for gi, gj in reshape_groups(src_shape, dst_shape):
        vary = any(ids.shape[a] > 1 for a in gi)
        for a in gi:
            inter.append(src_shape[a] if vary else 1)
        for b in gj:
            outs[b] = dst_shape[b] if vary else 1
    full = np.broadcast_to(ids, inter)
    return np.ascontiguousarray(full).reshape(outs)


@rule(*VIEW_OPS)
def view_rule(tr, args, kwargs, out):
    x = args[0]
    info = tr.info(x)
    ids = canonical(reshape_ids(info.ids, x.shape, out.shape), tr.uf)
    src = {}
    for name, amap in info.src.items():
        new = [None] * out.dim()
        for gi, gj in reshape_groups(list(x.shape), list(out.shape)):
            big_i = [a for a in gi if x.shape[a] > 1]
            big_j = [b for b in gj if out.shape[b] > 1]
            if len(big_i) == 1 and len(big_j) == 1:
                new[big_j[0]] = amap[big_i[0]]
        src[name] = tuple(new)
    tr.record_view(out, ids)
    return TensorInfo(ids, info.z, src, info.lin)


def _perm_info(info, perm):
    src = {n: tuple(m[p] for p in perm) for n, m in info.src.items()}
    return TensorInfo(np.transpose(info.ids, perm), info.z, src, info.lin)


@rule('permute')
def permute_rule(tr, args, kwargs, out):
    perm = [p % args[0].dim() for p in args[1]]
    return _perm_info(tr.info(args[0]), perm)


@rule('transpose', 't', 'transpose_', 'swapaxes')
def transpose_rule(tr, args, kwargs, out):
    n = args[0].dim()
    d0, d1 = (args[1] % n, args[2] % n) if len(args) > 2 else (0, 1)
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _perm_info(tr.info(args[0]), perm) if n > 1 else tr.info(args[0])


@rule('unsqueeze', 'unsqueeze_')
def unsqueeze_rule(tr, args, kwargs, out):
    info = tr.info(args[0])
    d = args[1] % out.dim()
    src = {n: m[:d] + (None, ) + m[d:] for n, m in info.src.items()}
    return TensorInfo(np.expand_dims(info.ids, d), info.z, src, info.lin)


@rule('squeeze', 'squeeze_')
def squeeze_rule(tr, args, kwargs, out):
    x, info = args[0], tr.info(args[0])
    dims = args[1] if len(args) > 1 else range(x.dim())
    dims = [dims] if isinstance(dims, int) else list(dims)
    drop = [d % max(x.dim(), 1) for d in dims if x.dim() and x.shape[d] == 1]
    keep = [a for a in range(x.dim()) if a not in drop]
    ids = info.ids.reshape([info.ids.shape[a] for a in keep])
    src = {n: tuple(m[a] for a in keep) for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin)


@rule('expand', 'expand_as', 'broadcast_to')
def expand_rule(tr, args, kwargs, out):
    info = tr.info(args[0])
    extra = out.dim() - info.ids.ndim
    ids = info.ids.reshape((1, ) * extra + info.ids.shape)
    src = {n: (None, ) * extra + m for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin)


def _index_axis(tr, x, axis, what):
    """Freeze channels if an op picks fixed positions along a channel axis."""
    info = tr.info(x)
    if not classes_identical_along(tr, info.ids, axis):
        tr.freeze(info.ids, f'{what} picks fixed positions on a channel axis')


@rule('select')
def select_rule(tr, args, kwargs, out):
    x, dim, idx = args[0], args[1] % args[0].dim(), args[2]
    _index_axis(tr, x, dim, 'select')
    info = tr.info(x)
    i = idx % x.shape[dim] if info.ids.shape[dim] > 1 else 0
    ids = np.take(info.ids, i, axis=dim)
    src = {n: m[:dim] + m[dim + 1:] for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin)


@rule('slice')
def slice_rule(tr, args, kwargs, out):
    x = args[0]
    dim = (args[1] if len(args) > 1 else 0) % x.dim()
    info = tr.info(x)
    if out.shape[dim] == x.shape[dim]:
        return info
    _index_axis(tr, x, dim, 'slice')
    ids = info.ids
    if ids.shape[dim] > 1:
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else x.shape[dim]
        step = args[4] if len(args) > 4 else 1
        sl = [slice(None)] * x.dim()
        sl[dim] = slice(start, min(end, x.shape[dim]), step)
        ids = ids[tuple(sl)]
    src = {n: m[:dim] + (None, ) + m[dim + 1:] for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin)


def _tie_chunks(tr, line, c, r, n):
    """``split(x, c)`` into ``n`` chunks: n - 1 of ``c``, the last of
    ``r`` (r <= c). Position j of every chunk is one channel, and so are
    positions j, j + r, j + 2r ... of the full chunks: every channel keeps
    a position in the last chunk, so after pruning the chunks are
    ``[c', ..., c', r']`` with 0 < r' <= c' and ``split(x, c')`` cuts them
    again."""
    pos = np.arange(c) % r
    rows = [line[k * c + np.arange(c)] for k in range(n - 1)]
    rows.append(line[(n - 1) * c + pos])
    for row in rows:
        tr.uf.union(rows[-1], row)


def _split_parts(tr, x, sizes, dim, out, by_size):
    info = tr.info(x)
    dim = dim % x.dim()
    ids = info.ids
    ch = channel_axis(tr.uf.find(ids))
    on_channels = ch == dim and ids.shape[dim] > 1
    n = len(sizes)
    if on_channels and by_size and n > 1 and \
            len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]:
        # split(x, c) (or equal chunks): every chunk keeps the same number
        # of channels, the last one at most as many (see _tie_chunks)
        _tie_chunks(tr, along(ids, dim, x.shape[dim]), sizes[0], sizes[-1],
                    n)
    # sizes given one by one are pruned independently; surgery updates the
    # module attributes that hold them (verification freezes the rest)
    res, start, parts = [], 0, []
    for s, o in zip(sizes, out):
        if ids.shape[dim] > 1:
            part = np.take(ids, range(start, start + s), axis=dim)
        else:
            part = ids
        start += s
        src = {n: m[:dim] + (None, ) + m[dim + 1:]
               for n, m in info.src.items()}
        res.append(TensorInfo(part, info.z, src, info.lin))
        if on_channels:
            parts.append(along(part, dim, s))
            tr.record_view(o, part)
    if on_channels and len(set(sizes)) > 1 and tr.stack:
        tr.split_sizes.append(SplitSizes(tr.current_module, list(sizes),
                                         parts))
    return res


@rule('split', 'split_with_sizes', 'chunk', 'unsafe_split',
      'split_with_sizes_copy', 'unsafe_chunk')
def split_rule(tr, args, kwargs, out):
    x = args[0]
    dim = args[2] if len(args) > 2 else kwargs.get('dim', 0)
    sizes = [o.shape[dim] for o in out]
    by_size = tr.current_op not in ('split_with_sizes',
                                    'split_with_sizes_copy') or \
        len(set(sizes)) == 1
    return _split_parts(tr, x, sizes, dim, out, by_size)


@rule('unbind')
def unbind_rule(tr, args, kwargs, out):
    x = args[0]
    dim = (args[1] if len(args) > 1 else 0) % x.dim()
    _index_axis(tr, x, dim, 'unbind')
    info = tr.info(x)
    res = []
    for i in range(len(out)):
        j = i if info.ids.shape[dim] > 1 else 0
        src = {n: m[:dim] + m[dim + 1:] for n, m in info.src.items()}
        res.append(TensorInfo(np.take(info.ids, j, axis=dim), info.z, src,
                              info.lin))
    return res


@rule('cat', 'concat', 'stack')
def cat_rule(tr, args, kwargs, out):
    tensors = [t for t in args[0]]
    stack = tr.current_op == 'stack'
    dim = (args[1] if len(args) > 1 else kwargs.get('dim', 0)) % out.dim()
    infos = []
    for t in tensors:
        info = tr.info(t)
        if stack:
            info = TensorInfo(np.expand_dims(info.ids, dim), info.z, {
                n: m[:dim] + (None, ) + m[dim + 1:]
                for n, m in info.src.items()}, None)
        infos.append(info)
    carriers = [i for i in infos if i.has_ids]
    if not carriers:
        src = {}
        for i in infos:
            src.update(i.src)
        return TensorInfo(empty_ids(out.dim()), all(i.z for i in infos), src)
    ch = channel_axis(carriers[0].ids)
    parts = []
    for t, info in zip(tensors, infos):
        size = 1 if stack else t.shape[dim]
        if not info.has_ids and ch is not None and ch != dim:
            # a block without channels joins along a non-channel axis:
            # parameter blocks (cls_token) ride along as passengers
            tr.attach(info, carriers[0].ids, ch, out.shape[ch], 'cat')
            ids = carriers[0].ids
        else:
            ids = info.ids
        shp = [max(p.ids.shape[a] for p in infos) if a != dim else size
               for a in range(out.dim())]
        parts.append(np.broadcast_to(ids, shp))
    ids = canonical(np.concatenate(parts, axis=dim), tr.uf)
    return TensorInfo(ids, all(i.z or not i.has_ids and not i.src
                               for i in infos) and
                      all(i.has_ids or ch == dim for i in infos))


@rule('index_put_', 'index_put', '_index_put_impl_')
def index_put_rule(tr, args, kwargs, out):
    """``dst[idx] = values`` on leading axes (RoI features filled level by
    level): ``dst`` takes the channels of ``values`` on the other axes. A
    buffer made without channels (``new_zeros(n, self.out_channels, ...)``)
    records its width, so that attribute follows pruning."""
    dst, indices, values = args[0], list(args[1]), args[2]
    di, vi = tr.info(dst), tr.info(values)
    dims = [d for d, i in enumerate(indices) if i is not None]
    if not vi.has_ids:
        return TensorInfo(di.ids, di.z and vi.z, di.src)
    if dims != list(range(len(dims))) or values.dim() > dst.dim() - \
            len(dims) + 1:
        tr.freeze(vi.ids, 'index_put with channels on indexed axes')
        return TensorInfo(di.ids, False)
    # values: (K, *dst.shape[len(dims):]) -> the trailing axes of dst
    vids = vi.ids.reshape((1, ) * (dst.dim() - len(dims) + 1 - vi.ids.ndim)
                          + vi.ids.shape)
    if vids.shape[0] > 1:
        tr.freeze(vi.ids, 'index_put with channels on indexed axes')
        return TensorInfo(di.ids, False)
    ids = vids.reshape((1, ) * len(dims) + vids.shape[1:])
    if di.has_ids:
        shp = np.broadcast_shapes(di.ids.shape, ids.shape)
        tr.uf.union(np.broadcast_to(di.ids, shp), np.broadcast_to(ids, shp))
        ids = np.where(np.broadcast_to(di.ids, shp) >= 0,
                       np.broadcast_to(di.ids, shp), np.broadcast_to(ids, shp))
    else:
        tr.record_view(dst, ids)
    return TensorInfo(canonical(np.ascontiguousarray(ids), tr.uf),
                      di.z and vi.z)
