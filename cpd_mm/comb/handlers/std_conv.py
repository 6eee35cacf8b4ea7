"""Weight-standardised convolutions: mmcv's ``ConvWS2d`` and ``ConvAWS2d``,
timm's ``StdConv2d`` and ``ScaledStdConv2d`` (and their 'Same' variants).

Such a conv standardises every filter over its fan-in (``in/groups x k x
k`` entries) before convolving::

    w'_o = gain_o * (w_o - mean(w_o)) / std(w_o) + shift_o

What that means for CPD:

- Its output is not linear in its weight (``w'_o`` does not change when
  ``w_o`` is scaled), so ``Σ θ·∂L/∂θ`` is not the gradient of a gate on its
  output: the handler names no site parameters, and the scorer takes the
  gate gradient from the output activation and its gradient.
- Removing output channels removes whole filters: slicing is exact (per-
  filter tensors such as ``gain`` are sliced too).
- Removing input channels removes entries from every filter and would change
  every filter's mean and std. The pruned conv, :class:`PrunedStdConv2d`,
  keeps what the removed entries contribute to them (per filter: their mean
  and sum of squared deviations; their count is fixed by the plan) and
  standardises the kept entries with the merged statistics: exact.

In the gated model the removed entries stay in the weight: a gated input
is zero, so they act through the statistics only, as they do in the pruned
conv, and the kept entries get the same gradients in both. Until surgery
the removed entries themselves still train (through the statistics, and
weight decay); the pruned conv holds their contribution fixed from then on.
"""
import importlib.util
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import CostTerm, keep_param, register_handler
from .conv import ConvHandler


def _same_pad(x, kernel, stride, dilation):
    """TensorFlow 'SAME' padding for the input's size (timm's *Same convs
    with a dynamic size): output size ceil(size / stride)."""
    pad = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pad.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pad
    return F.pad(x, [left, right, top, bottom]) if top or bottom or left \
        or right else x


class PrunedStdConv2d(nn.Conv2d):
    """A weight-standardised conv some of whose input channels were removed.

    It standardises every filter over its original fan-in: the kept entries
    (``weight``) and the removed ones, whose contribution is kept as
    buffers ``removed_mean`` and ``removed_m2`` (per filter: mean and sum of
    squared deviations of the removed entries; their number is
    ``fan_in`` minus the kept entries). The standardisation is that of the
    source module (attributes ``ddof``, ``eps``, ``eps_on_std``, ``scale``,
    ``same_pad``, and the per-filter ``gain_name`` / ``shift_name`` tensors,
    kept under the source's names).
    """

    def __init__(self, m: nn.Conv2d, form: dict):
        """The same conv as ``m`` (sharing its tensors), nothing removed
        yet; ``form`` is :func:`standardisation` of ``m``."""
        super().__init__(m.in_channels, m.out_channels, m.kernel_size,
                         m.stride, m.padding, m.dilation, m.groups,
                         bias=False, padding_mode=m.padding_mode,
                         device='meta')
        self.weight, self.bias = m.weight, m.bias
        w = m.weight
        self.fan_in = w[0].numel()
        self.ddof, self.eps = form['ddof'], form['eps']
        self.eps_on_std = form['eps_on_std']
        self.scale, self.same_pad = form['scale'], form['same_pad']
        self.gain_name, self.shift_name = form['gain'], form['shift']
        for name in (self.gain_name, self.shift_name):
            t = getattr(m, name) if name else None
            if isinstance(t, nn.Parameter):
                self.register_parameter(name, t)
            elif t is not None:
                self.register_buffer(name, t)
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        self.register_buffer('removed_mean', zeros)
        self.register_buffer('removed_m2', zeros.clone())
        self.train(m.training)

    def remove_fan_in(self, keep: np.ndarray) -> None:
        """Drop the fan-in entries of input positions ``~keep`` (a bool per
        input channel of one conv group) from ``weight``, folding their
        statistics into the buffers (Chan's parallel update, in float64 on
        the CPU: once per surgery)."""
        w = self.weight
        cpu = lambda t: t.detach().cpu().double()  # noqa: E731
        gone = cpu(w)[:, torch.as_tensor(np.nonzero(~keep)[0])].flatten(1)
        n_new = gone.shape[1]
        n_old = self.fan_in - w[0].numel()
        mean_new = gone.mean(1)
        m2_new = (gone - mean_new[:, None]).square().sum(1)
        mean_old = cpu(self.removed_mean)
        n = n_old + n_new
        delta = mean_new - mean_old
        mean = mean_old + delta * (n_new / n)
        m2 = cpu(self.removed_m2) + m2_new + \
            delta.square() * (n_old * n_new / n)
        self.removed_mean = mean.to(self.removed_mean)
        self.removed_m2 = m2.to(self.removed_m2)
        keep_param(self, 'weight', 1, keep)
        self.in_channels = int(keep.sum()) * self.groups

    def standardised_weight(self) -> torch.Tensor:
        w = self.weight
        flat = w.flatten(1)
        n, n_kept = self.fan_in, flat.shape[1]
        mean_kept = flat.mean(1)
        m2_kept = (flat - mean_kept[:, None]).square().sum(1)
        # merge the kept and removed entries' statistics (Chan et al.)
        delta = self.removed_mean - mean_kept
        mean = mean_kept + delta * ((n - n_kept) / n)
        m2 = m2_kept + self.removed_m2 + \
            delta.square() * (n_kept * (n - n_kept) / n)
        var = m2 / (n - self.ddof)
        std = var.sqrt() + self.eps if self.eps_on_std else \
            (var + self.eps).sqrt()
        shape = (-1, ) + (1, ) * (w.dim() - 1)
        factor = (1.0 / std).view(shape)
        if self.gain_name:
            factor = factor * getattr(self, self.gain_name).view(shape) * \
                self.scale
        out = (w - mean.view(shape)) * factor
        if self.shift_name:
            out = out + getattr(self, self.shift_name).view(shape)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = _same_pad(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardised_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


# ---------------------------------------------------------------- families
def _form(ddof, eps, eps_on_std=False, gain=None, shift=None, scale=1.0,
          same_pad=False):
    return dict(ddof=ddof, eps=float(eps), eps_on_std=eps_on_std, gain=gain,
                shift=shift, scale=float(scale), same_pad=bool(same_pad))


_FORMS: Dict[type, Callable[[nn.Module], dict]] = {
    PrunedStdConv2d: lambda m: _form(m.ddof, m.eps, m.eps_on_std,
                                     m.gain_name, m.shift_name, m.scale,
                                     m.same_pad)}
try:
    from mmcv.cnn.bricks.conv_ws import ConvAWS2d, ConvWS2d

    # torch.std (unbiased), eps added to the std
    _FORMS[ConvWS2d] = lambda m: _form(1, m.eps, eps_on_std=True)
    # unbiased variance + 1e-5 under the root, then a per-filter affine
    _FORMS[ConvAWS2d] = lambda m: _form(1, 1e-5, gain='weight_gamma',
                                        shift='weight_beta')
except ImportError:
    pass
if importlib.util.find_spec('timm') is not None:  # imported if installed
    try:
        from timm.layers import std_conv as _timm
    except ImportError:
        _timm = None
    if _timm is not None:
        # F.batch_norm over the weight: biased variance, eps under the root
        for _name in ('StdConv2d', 'StdConv2dSame'):
            _FORMS[getattr(_timm, _name)] = lambda m: _form(
                0, m.eps, same_pad=getattr(m, 'same_pad', False))
        for _name in ('ScaledStdConv2d', 'ScaledStdConv2dSame'):
            _FORMS[getattr(_timm, _name)] = lambda m: _form(
                0, m.eps, gain='gain', scale=m.scale,
                same_pad=getattr(m, 'same_pad', False))


def standardisation(m: nn.Module) -> Optional[dict]:
    """How ``m`` standardises its weight, or None if its class is not one
    of the known ones or overrides their forward (its own rule)."""
    for cls in type(m).__mro__:
        if cls in _FORMS:
            return _FORMS[cls](m) if type(m).forward is cls.forward \
                else None
    return None


@register_handler
class StdConvHandler(ConvHandler):
    """Weight-standardised convs (see the module docstring): traced as
    convs, scored from their output activations, pruned exactly."""
    module_types = tuple(_FORMS)

    def weight_rule(self, tr, m, args, kwargs, out_axis):
        if standardisation(m) is None:  # e.g. mmcv's SAConv2d
            return False, (f'{type(m).__name__}: a weight-standardised conv '
                           'with its own forward (no exact rule)')
        return False, ''  # not linear; the rule is below

    def cost_terms(self, m, rec):
        terms = super().cost_terms(m, rec)
        form = standardisation(m)
        p = getattr(m, form['gain'] or '', None) if form else None
        if isinstance(p, nn.Parameter):  # timm's per-filter gain
            per = p.numel() // p.shape[0]
            terms.append(CostTerm('params', per * rec.mult, (rec.inputs, ))
                         if rec.depthwise else
                         CostTerm('params', per, (rec.outputs, )))
        return terms

    def prune(self, m, rec, keep):
        kin = keep(rec.inputs)
        kout = np.repeat(kin, rec.mult) if rec.depthwise else \
            keep(rec.outputs)
        if kin.all() and kout.all():  # (a forward of its own: frozen)
            return None
        form = standardisation(m)
        new = None
        if not rec.depthwise and not kin.all():
            # input entries leave every filter: keep their statistics
            new = m if isinstance(m, PrunedStdConv2d) else \
                PrunedStdConv2d(m, form)
            local = kin[:m.in_channels // m.groups]
            new.remove_fan_in(local)
            # the conv slicing below sees no input channel to remove
            kin_all = np.ones(new.in_channels, dtype=bool)
            keep = _inputs_kept(keep, rec.inputs, kin_all)
        target = new if new is not None else m
        super().prune(target, rec, keep)
        for name in (form['gain'], form['shift'], 'removed_mean',
                     'removed_m2'):
            if name and getattr(target, name, None) is not None:
                keep_param(target, name, 0, kout)
        return None if target is m else target


def _inputs_kept(keep, inputs, kin):
    """``keep`` with the conv's input atoms answered by ``kin``."""
    def fn(atoms):
        return kin if atoms is inputs else keep(atoms)
    return fn
