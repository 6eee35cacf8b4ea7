"""Convolutions: plain, grouped, depthwise, and transposed.

Gate gradients and surgery by slicing assume that a conv's output is
linear in its weight and bias, channel by channel. torch's own forwards
are; a subclass's forward (mmcv's wrappers, a weight-standardised conv) is
checked once when traced (:func:`linear_in_weight`), and one that is not
linear freezes its channels unless a handler of its own (such as
:mod:`.std_conv`) gives the exact rule.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..space import TensorInfo
from .base import (CostTerm, ModuleHandler, ModuleRecord, first_tensor,
                   input_atoms, keep_param, register_handler)


@dataclass
class ConvRecord(ModuleRecord):
    groups: int = 1
    kernel: int = 1
    spatial: int = 0          # output positions per sample, all calls
    depthwise: bool = False
    mult: int = 1             # depthwise: outputs per input channel
    linear: Optional[bool] = None  # output linear in weight rows and bias
    inputs: Optional[np.ndarray] = None
    outputs: Optional[np.ndarray] = None
    atom_fields = ('inputs', 'outputs')


_TORCH_FORWARDS = tuple(c.forward for c in (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d))


def linear_in_weight(tr, m: nn.Module, args, kwargs,
                     out_axis: int) -> Tuple[bool, str]:
    """Whether ``m``'s output is homogeneous of degree one in each output
    channel's weight slice (along ``out_axis``) and bias, and if not, why.

    torch's own forwards are, on a weight that is a parameter. Another
    forward is run once more on random values (the tracer ignores it): with
    weight and bias scaled per output channel by 2 or 1/2, a linear conv's
    output scales by the same factors, exactly (powers of two). A module
    with submodules, or called with more than its input, is not a plain
    conv."""
    kind = type(m).__name__
    if not isinstance(m._parameters.get('weight'), nn.Parameter):
        return False, (f'{kind}: its weight is computed (a parametrization '
                       'or weight norm)')
    if type(m).forward in _TORCH_FORWARDS:
        return True, ''
    if any(True for _ in m.children()) or len(args) + len(kwargs) != 1:
        return False, f'{kind}: a conv with submodules or extra inputs'
    x = first_tensor(args, kwargs)
    gen = torch.Generator().manual_seed(0)
    draw = lambda t: torch.randn(t.shape, generator=gen).to(t)  # noqa: E731
    # a small input: one sample, positions enough for one output or two
    reach = [slice(0, (k - 1) * d + 1 + s) for k, d, s in
             zip(m.kernel_size, m.dilation, m.stride)]
    x = draw(x[tuple([slice(0, 1)] * (x.dim() - len(reach) - 1) +
                     [slice(None)] + reach)])
    params = {n: draw(p) for n, p in m._parameters.items() if p is not None}
    w = params['weight']
    shape = [1] * w.dim()
    shape[out_axis] = -1
    scale = torch.tensor([2.0, 0.5]).repeat(w.shape[out_axis] // 2 + 1)
    scale = scale[:w.shape[out_axis]].to(w)
    probe = nn.Module.__new__(type(m))
    probe.__dict__ = dict(vars(m), _parameters=params)
    tr.suppress += 1  # not part of the model's forward
    try:
        base = type(m).forward(probe, x)
        probe._parameters = dict(params, weight=w * scale.view(shape))
        if params.get('bias') is not None:
            probe._parameters['bias'] = params['bias'] * scale
        scaled = type(m).forward(probe, x)
    except Exception as e:  # noqa: BLE001  a forward that needs more
        return False, f'{kind}: forward failed on random values ({e!r})'
    finally:
        tr.suppress -= 1
    if not isinstance(base, torch.Tensor) or base.dim() < 2 or \
            base.shape[1] != scale.numel():
        return False, f'{kind}: output channels are not on axis 1'
    view = [1] * base.dim()
    view[1] = -1
    want = base * scale.view(view)
    tol = 1e-5 * float(want.abs().max().clamp_min(1e-30))
    if float((scaled - want).abs().max()) > tol:
        return False, (f'{kind}: output not linear in its weight (no rule '
                       'for its weight transform)')
    return True, ''


def _check_linear(handler, tr, m, rec, args, kwargs, out_axis):
    """Decide ``rec.linear`` once per module; freeze the module's channels
    where no rule covers its weight transform."""
    if rec.linear is None:
        rec.linear, why = handler.weight_rule(tr, m, args, kwargs, out_axis)
        if why:
            tr.freeze(rec.inputs, why)
            tr.freeze(rec.inputs if rec.depthwise else rec.outputs, why)


def _nothing_removed(rec, keep) -> bool:
    return all(keep(a).all() for a in rec.atom_arrays().values())


def _spatial(tr, t, channels):
    """Positions per sample that one channel of ``t`` spans."""
    return tr.per_sample(t.numel()) // max(channels, 1)


@register_handler
class ConvHandler(ModuleHandler):
    """``nn.Conv1d/2d/3d``. A plain conv is a stop op. A grouped conv ties
    position j of every conv group together (every group keeps the same
    number of channels). A depthwise conv creates no space: output channel
    ``k*mult + i`` reads input channel ``k`` only."""
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def trace(self, tr, name, m, args, kwargs, out):
        g, cin, cout = m.groups, m.in_channels, m.out_channels
        rec = tr.module_record(name, ConvRecord)
        ins = input_atoms(tr, name, tr.info(first_tensor(args, kwargs)), 1,
                          cin)
        rec.groups, rec.kernel = g, int(np.prod(m.kernel_size))
        rec.spatial += _spatial(tr, out, cout)
        if g > 1 and cin == g:
            rec.depthwise, rec.mult = True, cout // g
            rec.merge(tr, inputs=ins)
            outs = np.repeat(rec.inputs, rec.mult)
            tr.add_channelwise(name, rec.inputs)
        else:
            if g > 1:
                tr.uf.union(np.tile(ins[:cin // g], g), ins)
                new = np.tile(tr.new_atoms(cout // g), g)
            else:
                new = tr.new_atoms(cout)
            rec.merge(tr, inputs=ins, outputs=new)
            outs = rec.outputs
            tr.add_producer(name, outs, out)
        _check_linear(self, tr, m, rec, args, kwargs, 0)
        shape = [1] * out.dim()
        shape[1] = cout
        # removed output channels are not zero (weights stay): gate needed
        return TensorInfo(outs.reshape(shape), False, lin=name)

    def weight_rule(self, tr, m, args, kwargs,
                    out_axis) -> Tuple[bool, str]:
        """``(linear, why)``: whether the output is linear in the weight
        rows and bias (:func:`linear_in_weight`), and if it is not and no
        rule covers it, why the module's channels are frozen ('' when a
        rule covers it: a subclass handler says so)."""
        return linear_in_weight(tr, m, args, kwargs, out_axis)

    def site_parameters(self, m, rec):
        # only where Σθ·∂L/∂θ is the gate gradient; else the activations
        return [('weight', 0), ('bias', 0)] if rec.linear is not False \
            else []

    def cost_terms(self, m, rec):
        k, sp = rec.kernel, rec.spatial
        if rec.depthwise:
            per = k * rec.mult
            terms = [CostTerm('params', per, (rec.inputs, )),
                     CostTerm('flops', per * sp, (rec.inputs, ))]
            if m.bias is not None:
                terms.append(CostTerm('params', rec.mult, (rec.inputs, )))
            return terms
        f = k / rec.groups
        terms = [CostTerm('params', f, (rec.inputs, rec.outputs)),
                 CostTerm('flops', f * sp, (rec.inputs, rec.outputs))]
        if m.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def latency_widths(self, m, rec):
        return [rec.inputs] if rec.depthwise else [rec.inputs, rec.outputs]

    def prune(self, m, rec, keep):
        kin = keep(rec.inputs)
        if _nothing_removed(rec, keep):  # e.g. frozen: leave it as it is
            return None
        if rec.depthwise:
            kout = np.repeat(kin, rec.mult)
            keep_param(m, 'weight', 0, kout)
            keep_param(m, 'bias', 0, kout)
            n = int(kin.sum())
            m.in_channels, m.groups, m.out_channels = n, n, n * rec.mult
            return None
        kout = keep(rec.outputs)
        g = m.groups
        if g == 1:
            keep_param(m, 'weight', 0, kout)
            keep_param(m, 'weight', 1, kin)
        else:
            a, b = m.in_channels // g, m.out_channels // g
            w = m.weight.data
            w = w.reshape(g, b, a, *w.shape[2:])
            ji = torch.as_tensor(np.nonzero(kin[:a])[0], device=w.device)
            jo = torch.as_tensor(np.nonzero(kout[:b])[0], device=w.device)
            w = w[:, jo][:, :, ji].reshape(g * len(jo), len(ji),
                                           *w.shape[3:])
            m.weight = nn.Parameter(w.clone(),
                                    requires_grad=m.weight.requires_grad)
        keep_param(m, 'bias', 0, kout)
        m.in_channels, m.out_channels = int(kin.sum()), int(kout.sum())
        return None


@register_handler
class ConvTransposeHandler(ModuleHandler):
    """``nn.ConvTranspose1d/2d/3d`` with one group: a stop op whose weight
    is ``[in, out, k...]``. Grouped transposed convs are frozen."""
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d)

    def trace(self, tr, name, m, args, kwargs, out):
        x = first_tensor(args, kwargs)
        info = tr.info(x)
        if m.groups != 1:
            tr.freeze(info.ids, f'{name}: grouped transposed convolution')
            return TensorInfo(np.full((1, ) * out.dim(), -1), True)
        rec = tr.module_record(name, ConvRecord)
        ins = input_atoms(tr, name, info, 1, m.in_channels)
        rec.kernel = int(np.prod(m.kernel_size))
        rec.spatial += _spatial(tr, x, m.in_channels)  # MACs per input position
        rec.merge(tr, inputs=ins, outputs=tr.new_atoms(m.out_channels))
        tr.add_producer(name, rec.outputs, out)
        _check_linear(self, tr, m, rec, args, kwargs, 1)
        shape = [1] * out.dim()
        shape[1] = m.out_channels
        return TensorInfo(rec.outputs.reshape(shape), False, lin=name)

    def weight_rule(self, tr, m, args, kwargs, out_axis):
        return linear_in_weight(tr, m, args, kwargs, out_axis)

    def site_parameters(self, m, rec):
        return [('weight', 1), ('bias', 0)] if rec.linear is not False \
            else []

    def cost_terms(self, m, rec):
        terms = [CostTerm('params', rec.kernel, (rec.inputs, rec.outputs)),
                 CostTerm('flops', rec.kernel * rec.spatial,
                          (rec.inputs, rec.outputs))]
        if m.bias is not None:
            terms.append(CostTerm('params', 1, (rec.outputs, )))
        return terms

    def prune(self, m, rec, keep):
        if _nothing_removed(rec, keep):
            return None
        kin, kout = keep(rec.inputs), keep(rec.outputs)
        keep_param(m, 'weight', 0, kin)
        keep_param(m, 'weight', 1, kout)
        keep_param(m, 'bias', 0, kout)
        m.in_channels, m.out_channels = int(kin.sum()), int(kout.sum())
        return None
