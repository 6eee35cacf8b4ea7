"""Stop ops and normalisations handled at module level: one entry per type.

Each handler knows how a module type moves channels during tracing
(``trace``) and how to slice it during surgery (``prune``).  Adding a layer
type is one entry in :data:`HANDLERS` (Torch-Pruning's idea of a pruning
function per layer type, kept in one table).

``trace`` returns the output :class:`TensorInfo` and stores what surgery needs
in the module record ``rec`` (a dict kept across calls of shared modules).
``prune`` receives boolean keep-masks built from those atoms.
"""
import numpy as np
import torch
import torch.nn as nn

from .space import TensorInfo, along, channel_axis, empty_ids


def _keep_param(module, pname, axis, keep):
    """Keep the entries ``keep`` (bool mask) of ``module.<pname>`` along
    ``axis``; parameters stay parameters, buffers stay buffers."""
    p = getattr(module, pname, None)
    if p is None:
        return
    idx = torch.as_tensor(np.nonzero(keep)[0], device=p.device)
    new = torch.index_select(p.data, axis, idx).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, pname, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(module, pname, new)


def _input_atoms(tr, name, info, axis, size):
    """Atoms a consumer reads along ``axis``; freeze if channels lie
    elsewhere (the consumer would mix them with spatial positions)."""
    cls = tr.uf.find(info.ids)
    ch = channel_axis(cls)
    if ch is not None and ch != axis % info.ids.ndim:
        tr.freeze(info.ids, f'{name} reads channels on another axis')
        return np.full(size, -1, dtype=np.int64)
    if info.has_ids and not info.z:
        tr.freeze(info.ids, f'channels reach {name} through an op that does '
                  'not keep removed channels at zero')
    return along(info.ids, axis, size)


def _merge(tr, rec, key, atoms):
    if key in rec:
        tr.uf.union(rec[key], atoms)
    else:
        rec[key] = atoms


class ConvHandler:
    """nn.Conv1d/2d/3d, including grouped and depthwise convolutions."""
    kind = 'conv'

    @staticmethod
    def trace(tr, name, m, info, x, out):
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        rec = tr.module_record(name, 'conv')
        ins = _input_atoms(tr, name, info, 1, cin)
        rec['groups'] = g
        rec['kernel'] = int(np.prod(m.kernel_size))
        rec['spatial'] = out.numel() // max(out.shape[0] * cout, 1)
        if g == 1:
            _merge(tr, rec, 'in', ins)
            outs = tr.new_atoms(cout)
            _merge(tr, rec, 'out', outs)
            tr.add_producer(name, rec['out'], out)
        elif cin == g:
            # depthwise: output channel k*m+i reads input channel k only, so
            # it belongs to the same channel (no new space is created)
            outs = np.repeat(ins, cout // g)
            _merge(tr, rec, 'in', ins)
            rec['dw'] = True
            tr.add_channelwise(name, ins)
        else:
            # grouped: every conv group must keep the same number of
            # channels, so position j of every group is one channel
            tr.uf.union(np.repeat(ins[:cin // g][None], g, 0).ravel(), ins)
            _merge(tr, rec, 'in', ins)
            outs = tr.new_atoms(cout // g)
            outs = np.tile(outs, g)
            _merge(tr, rec, 'out', outs)
            tr.add_producer(name, rec['out'], out)
        shape = [1] * out.dim()
        shape[1] = cout
        # removed output channels are not zero (weights stay): gate needed
        return TensorInfo(outs.reshape(shape), False, lin=name)

    @staticmethod
    def prune(m, rec, keep):
        g = m.groups
        kin = keep(rec['in'])
        w = m.weight.data
        if rec.get('dw'):
            mult = m.out_channels // g
            kout = np.repeat(kin, mult)
            _keep_param(m, 'weight', 0, kout)
            _keep_param(m, 'bias', 0, kout)
            n = int(kin.sum())
            m.in_channels, m.groups, m.out_channels = n, n, n * mult
            return
        kout = keep(rec['out'])
        if g == 1:
            _keep_param(m, 'weight', 0, kout)
            _keep_param(m, 'weight', 1, kin)
        else:
            a, b = m.in_channels // g, m.out_channels // g
            w = w.reshape(g, b, a, *w.shape[2:])
            ji = torch.as_tensor(np.nonzero(kin[:a])[0])
            jo = torch.as_tensor(np.nonzero(kout[:b])[0])
            w = w[:, jo][:, :, ji].reshape(g * len(jo), len(ji),
                                           *w.shape[3:])
            m.weight = nn.Parameter(w.clone(),
                                    requires_grad=m.weight.requires_grad)
        _keep_param(m, 'bias', 0, kout)
        m.in_channels, m.out_channels = int(kin.sum()), int(kout.sum())


class LinearHandler:
    kind = 'linear'

    @staticmethod
    def trace(tr, name, m, info, x, out):
        rec = tr.module_record(name, 'linear')
        rec['spatial'] = out.numel() // max(m.out_features, 1)
        _merge(tr, rec, 'in', _input_atoms(tr, name, info, -1, m.in_features))
        outs = tr.new_atoms(m.out_features)
        _merge(tr, rec, 'out', outs)
        tr.add_producer(name, rec['out'], out)
        return TensorInfo(outs.reshape((1, ) * (out.dim() - 1) + (-1, )),
                          False, lin=name)

    @staticmethod
    def prune(m, rec, keep):
        kin, kout = keep(rec['in']), keep(rec['out'])
        _keep_param(m, 'weight', 0, kout)
        _keep_param(m, 'weight', 1, kin)
        _keep_param(m, 'bias', 0, kout)
        m.in_features, m.out_features = int(kin.sum()), int(kout.sum())


class NormHandler:
    """BatchNorm (channel axis 1), LayerNorm (last axis), GroupNorm."""
    kind = 'norm'

    @staticmethod
    def trace(tr, name, m, info, x, out):
        rec = tr.module_record(name, 'norm')
        if isinstance(m, nn.LayerNorm):
            axis, size = -1, m.normalized_shape[-1]
            if len(m.normalized_shape) > 1 and info.has_ids:
                tr.freeze(info.ids, f'{name}: LayerNorm over several axes')
        else:
            axis, size = 1, x.shape[1]
        cls = tr.uf.find(info.ids)
        ch = channel_axis(cls)
        if ch is not None and ch != axis % x.dim():
            tr.freeze(info.ids, f'{name} normalises across a channel axis')
        ids = along(info.ids, axis, size)
        if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
            g = m.num_groups
            tr.uf.union(np.repeat(ids[:size // g][None], g, 0).ravel(), ids)
        _merge(tr, rec, 'in', ids)
        rec['norm'] = type(m).__name__
        rec['follows'] = info.lin
        tr.add_channelwise(name, ids, norm=True, src_lin=info.lin)
        masked = isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and info.has_ids
        if masked:
            tr.masked_norms.add(name)
        # BatchNorm turns a zero into its bias; masked LN/GN output zeros
        return TensorInfo(info.ids, masked)

    @staticmethod
    def prune(m, rec, keep):
        k = keep(rec['in'])
        for p in ('weight', 'bias', 'running_mean', 'running_var'):
            _keep_param(m, p, 0, k)
        n = int(k.sum())
        if isinstance(m, nn.LayerNorm):
            m.normalized_shape = tuple(m.normalized_shape[:-1]) + (n, )
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = n
        else:
            m.num_features = n


class OpaqueHandler:
    """Modules whose internal widths are tied together in ways surgery cannot
    change (nn.MultiheadAttention ties embed_dim to its inner width):
    every channel entering or leaving is frozen."""
    kind = 'opaque'

    @staticmethod
    def trace(tr, name, m, info, x, out):
        for t in tr.tensors_of(x):
            tr.freeze(tr.info(t).ids, f'{name}: {type(m).__name__} ties its '
                      'widths together (not prunable)')
        return TensorInfo(empty_ids(out.dim()), True)

    @staticmethod
    def prune(m, rec, keep):
        pass


HANDLERS = {
    nn.Conv1d: ConvHandler, nn.Conv2d: ConvHandler, nn.Conv3d: ConvHandler,
    nn.Linear: LinearHandler,
    nn.BatchNorm1d: NormHandler, nn.BatchNorm2d: NormHandler,
    nn.BatchNorm3d: NormHandler, nn.SyncBatchNorm: NormHandler,
    nn.LayerNorm: NormHandler, nn.GroupNorm: NormHandler,
    nn.ConvTranspose1d: OpaqueHandler, nn.ConvTranspose2d: OpaqueHandler,
    nn.Embedding: OpaqueHandler,
}


# attention.py imports helpers from this file, so its entry comes last
from .attention import MultiheadAttentionHandler  # noqa: E402

HANDLERS[nn.MultiheadAttention] = MultiheadAttentionHandler


def handler_for(module):
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return HANDLERS[cls]
    return None
