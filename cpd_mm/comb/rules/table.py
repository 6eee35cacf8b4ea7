"""The aten rule table: how each op moves channel atoms.

A rule receives the tracer, the op's positional args and kwargs and its
output, and returns the :class:`TensorInfo` of the output (or a list for ops
returning several tensors). Ops without a rule are handled conservatively by
the tracer: every channel they touch is frozen, and the op is reported by
name.
"""
import numpy as np
import torch

from ..space import TensorInfo, empty_ids

# op-name -> rule; names are aten overload packets ("add", "view", ...)
RULES = {}

# ops whose outputs carry no channels and that read none
NO_CHANNEL_OPS = {
    'ones', 'empty', 'full', 'arange', 'ones_like',
    'empty_like', 'full_like', 'rand', 'randn', 'rand_like', 'randn_like',
    'scalar_tensor', 'linspace', 'bernoulli', 'bernoulli_', 'uniform_',
    'normal_', 'new_ones', 'new_empty', 'new_full', 'sym_size',
    'sym_numel', 'sym_stride', 'is_same_size', '_local_scalar_dense', 'item',
    'eye', 'tril', 'triu', 'randint', 'randperm', 'empty_strided', 'zero_',
    'argmax', 'argmin', 'sort', 'topk', '_assert_async', 'argsort', 'any',
    'all', 'meshgrid', 'lift_fresh', 'detach_', 'set_', 'resize_',
    'record_stream', 'equal', 'is_nonzero', '_to_dense'}

# ops that create channels (convs, linears) when called on parameters
# outside a handled module: functional stop ops, frozen with their names
STOP_OPS = {'convolution', 'linear', 'addmm', 'conv2d', 'conv1d', 'conv3d',
            'baddbmm', 'addbmm', '_convolution', 'embedding',
            'convolution_overrideable', 'mkldnn_convolution',
            'cudnn_convolution', 'conv_transpose2d'}


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def is_tensor(x):
    return isinstance(x, torch.Tensor)


def classes_identical_along(tr, ids, axis):
    """True if every position along ``axis`` holds the same channels."""
    if ids.shape[axis] == 1:
        return True
    cls = tr.uf.find(ids)
    first = np.take(cls, [0], axis=axis)
    return bool((cls == first).all())


def aligned(info, ndim):
    """``info`` broadcast to rank ``ndim`` (leading axes of size 1)."""
    ids = info.ids.reshape((1, ) * (ndim - info.ids.ndim) + info.ids.shape)
    src = {n: (None, ) * (ndim - len(m)) + m for n, m in info.src.items()}
    return TensorInfo(ids, info.z, src, info.lin, info.zero)


@rule('zeros', 'zeros_like', 'new_zeros')
def zeros_rule(tr, args, kwargs, out):
    """A tensor of zeros: no channels, and adding it changes nothing."""
    return TensorInfo(empty_ids(out.dim()), True, zero=True)
