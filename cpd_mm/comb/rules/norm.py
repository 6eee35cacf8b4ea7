"""Normalisation ops. Their affine parameters and running statistics are
passengers; layer and group norms whose statistics run over channels are
recorded as :class:`~cpd_mm.comb.records.NormSite`: the gated model
normalises over active channels only, so it matches the pruned model."""
import numpy as np

from ..records import NormSite
from ..space import TensorInfo, along, channel_axis
from .table import is_tensor, rule


def _passengers(tr, tensors, line, kind):
    for t in tensors:
        if is_tensor(t) and t.numel() > 1:
            tr.attach_line(tr.info(t), line, 0 if t.dim() == 1 else None,
                           kind)


def _outs(out, first):
    return [first] + [None] * (len(out) - 1) if isinstance(
        out, (tuple, list)) else first


@rule('native_layer_norm')
def layer_norm_rule(tr, args, kwargs, out):
    x, shape = args[0], list(args[1])
    w = args[2] if len(args) > 2 else kwargs.get('weight')
    b = args[3] if len(args) > 3 else kwargs.get('bias')
    index = tr.norm_op_index()
    info = tr.info(x)
    nd, k = x.dim(), len(shape)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is None:
        return _outs(out, TensorInfo(info.ids, True))
    if ch < nd - k:
        # statistics per channel over positions: LN(0) is the bias
        return _outs(out, TensorInfo(info.ids, False))
    line = along(info.ids, ch, x.shape[ch])
    pax = ch - (nd - k)  # channel axis of weight and bias
    for t in (w, b):
        if is_tensor(t):
            tr.attach_line(tr.info(t), line, pax, 'layer_norm')
    tr.add_norm_site(index, 'layer_norm', line, ch - nd, pax)
    return _outs(out, TensorInfo(info.ids, True))


@rule('native_group_norm')
def group_norm_rule(tr, args, kwargs, out):
    x, w, b = args[0], args[1], args[2]
    C, G = int(args[4]), int(args[6])
    index = tr.norm_op_index()
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is None:
        return _outs(out, TensorInfo(info.ids, True))
    if ch != 1:
        tr.freeze(info.ids, 'group_norm over channels off axis 1')
        return _outs(out, TensorInfo(info.ids, True))
    line = along(info.ids, 1, C)
    _passengers(tr, (w, b), line, 'group_norm')
    if G == C:  # one channel per group: no statistic mixes channels
        tr.add_norm_record(line, 0, per_channel_groups=True)
        tr.add_channelwise(tr.current_module, line)
        return _outs(out, TensorInfo(info.ids, False))
    # every group keeps the same number of channels: position j of every
    # group is one channel
    tr.uf.union(np.tile(line[:C // G], G), line)
    tr.add_norm_site(index, 'group_norm', line, 1, 0)
    return _outs(out, TensorInfo(info.ids, True))


@rule('native_batch_norm', '_native_batch_norm_legit',
      '_native_batch_norm_legit_no_training',
      '_native_batch_norm_legit_functional', 'cudnn_batch_norm',
      'miopen_batch_norm')
def batch_norm_rule(tr, args, kwargs, out):
    x = args[0]
    info = tr.info(x)
    ch = channel_axis(tr.uf.find(info.ids))
    if ch is None:
        return _outs(out, TensorInfo(info.ids, info.z))
    if ch != 1:
        tr.freeze(info.ids, 'batch_norm over channels off axis 1')
        return _outs(out, TensorInfo(info.ids, False))
    line = along(info.ids, 1, x.shape[1])
    _passengers(tr, args[1:5], line, 'batch_norm')
    tr.add_norm_record(line, 0)
    tr.add_channelwise(tr.current_module, line)
    # a removed channel becomes the BatchNorm's bias: not zero
    return _outs(out, TensorInfo(info.ids, False))
