"""Generic weights: a structural copy on which no branch is silent.

An exactness check (gated vs pruned outputs) is only as good as the weights
it runs on. Freshly initialised models silence whole branches: the last BN
of a bottleneck with ``zero_init_residual`` (gamma = 0), a layer scale of
1e-6 (ConvNeXt, PoolFormer), a zero-initialised head. Inside a silent
branch any rule passes, right or wrong. :func:`generic_copy` returns a copy
of the model with every floating-point parameter and every normalisation
statistic re-drawn to generic values, so that every channel reaches the
output:

- weights of convs, linears and attention projections (``*weight`` with two
  or more dims): normal with std ``1/sqrt(fan_in)`` (fan-in = every dim but
  the first), so activations keep their scale through depth;
- embedding tables, ``pos_embed``, ``cls_token``, relative position bias
  tables and other parameters of two or more dims: normal, std 0.5;
- norm weights, layer scales and other scale-like parameters of at most one
  dim: uniform in [0.5, 1.5];
- biases (any parameter whose name contains ``bias``, norm biases
  included): random sign times uniform in [0.1, 0.5], never zero;
- ``running_mean``: random sign times uniform in [0.1, 0.5];
  ``running_var``: uniform in [0.5, 2]; affine buffers named ``*gamma*`` /
  ``*beta*`` (mmcv ``ConvAWS2d``) like norm weights / biases.

Other buffers are left as they are (and shared with the model, not
copied): they are constants of the structure (index tables, attention masks,
anchors, pixel mean/std), not learned values. Integer tensors are never
touched. Every value comes from a private ``torch.Generator`` seeded with
``seed`` (drawn on the CPU, then moved to the tensor's device and dtype), so
the copy is the same on every run and rank and the caller's random stream is
left alone.
"""
import math

import torch
import torch.nn as nn

from .surgery import structural_copy

# modules whose ``weight`` is a per-channel scale, whatever its dims
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
          nn.LocalResponseNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith(
        ('Norm', 'Norm1d', 'Norm2d', 'Norm3d'))


def _signed(shape, gen, lo=0.1, hi=0.5):
    mag = torch.empty(shape).uniform_(lo, hi, generator=gen)
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return mag * sign


def fan_in_gain(weight: torch.Tensor):
    """``rms * sqrt(fan_in)`` of a weight of two or more dims (1 for a
    drawn one), or None where the weight is not generic: not finite, a gain
    below 0.01 (zero or faint), an output row or an input column constant
    (a zero-initialised head, a constant averaging kernel, an input channel
    it ignores). One read of the tensor: far cheaper than drawing it."""
    w = weight.detach().flatten(1)
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    flat = w.reshape(-1)
    sumsq = float(torch.dot(flat, flat))  # inf or NaN if any entry is
    gain = math.sqrt(sumsq / w.shape[0]) if math.isfinite(sumsq) else 0.0
    if gain < 0.01 or _has_constant_line(w, 1):
        return None
    if w.shape[0] > 1 and _has_constant_line(w, 0):
        return None
    return gain


def _has_constant_line(w: torch.Tensor, dim: int) -> bool:
    """Whether a line of the matrix ``w`` along ``dim`` (rows: 1, columns:
    0) has one value throughout. Exact, at the cost of two lines for a
    generic weight: a constant line has equal first and second entries, so
    only the lines where those match are read in full."""
    if w.shape[dim] < 2:
        return True
    same = (w.select(dim, 0) == w.select(dim, 1)).nonzero().flatten()
    if not same.numel():
        return False
    lines = w.index_select(1 - dim, same)
    return bool((lines.amax(dim) == lines.amin(dim)).any())


def generic_value(module: nn.Module, name: str, tensor: torch.Tensor,
                  gen: torch.Generator, is_buffer: bool = False,
                  redraw_weights: bool = True):
    """The generic value for ``module``'s parameter or buffer ``name``, or
    None to leave it (integer tensors, buffers that are not statistics,
    and with ``redraw_weights=False`` weights whose :func:`fan_in_gain` is
    within [0.25, 4]; other generic ones are scaled to gain 1)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    shape = tuple(tensor.shape)
    if is_buffer:
        if name == 'running_var':
            return torch.empty(shape).uniform_(0.5, 2.0, generator=gen)
        if name == 'running_mean':
            return _signed(shape, gen)
        # affine terms kept as buffers (mmcv ConvAWS2d's weight_gamma /
        # weight_beta): at 1 and 0 a rule that drops them would pass
        if 'gamma' in name:
            return torch.empty(shape).uniform_(0.5, 1.5, generator=gen)
        if 'beta' in name:
            return _signed(shape, gen)
        return None
    if 'bias' in name:
        return _signed(shape, gen)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=gen) * 0.5
    if tensor.dim() >= 2 and not _is_norm(module):
        if 'weight' in name:
            gain = None if redraw_weights else fan_in_gain(tensor)
            if gain is not None:
                # the model's own pattern, at about the gain of a drawn one
                # (trained weights with random statistics would blow up)
                return None if 0.25 <= gain <= 4 else tensor.detach() / gain
            fan_in = math.prod(shape[1:])
            return torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        return torch.randn(shape, generator=gen) * 0.5
    return torch.empty(shape).uniform_(0.5, 1.5, generator=gen)


def _redraw(model: nn.Module, seed: int, replace: bool,
            redraw_weights: bool = True) -> nn.Module:
    """Give every parameter and statistic of ``model`` its generic value:
    written into the tensor (``replace=False``) or as a new tensor in its
    place (``replace=True``: the old tensor is not touched). Tensors shared
    by several modules (tied weights) get one value."""
    gen = torch.Generator().manual_seed(seed)
    done = {}  # id(old tensor) -> its generic replacement
    for module in model.modules():
        for slot, is_buffer in ((module._parameters, False),
                                (module._buffers, True)):
            for name, tensor in list(slot.items()):
                if tensor is None:
                    continue
                if id(tensor) not in done:
                    value = generic_value(module, name, tensor, gen,
                                          is_buffer, redraw_weights)
                    if value is None:
                        done[id(tensor)] = tensor
                        continue
                    value = value.to(tensor.device, tensor.dtype)
                    if not replace:
                        tensor.copy_(value)
                        value = tensor
                    elif isinstance(tensor, nn.Parameter):
                        value = nn.Parameter(
                            value, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = value
                slot[name] = done[id(tensor)]
    return model


@torch.no_grad()
def redraw_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw ``model``'s parameters and normalisation statistics in place
    (see the module docstring). Returns ``model``."""
    return _redraw(model, seed, replace=False)


@torch.no_grad()
def generic_copy(model: nn.Module, seed: int = 0,
                 redraw_weights: bool = True) -> nn.Module:
    """A copy of ``model`` (same structure, modes, dtype and device) with
    generic values; ``model`` is not modified. The copy's modules are new
    and so is every re-drawn tensor; tensors left as they are (integer
    buffers, masks, index tables) are shared with ``model``, not copied.

    ``redraw_weights=False`` keeps the patterns of the weights of two or
    more dims that are generic (the model's own random or trained ones, see
    :func:`fan_in_gain`; scaled to the gain of a drawn weight where it is
    off by more than 4x) and re-draws the rest and everything else: what
    matters for an exactness
    check (no silent branch, no symmetric channels) at a fraction of the
    cost, which comb's verification needs (drawing every weight of a
    ResNet-50 costs about as much as a forward)."""
    return _redraw(structural_twin(model), seed, replace=True,
                   redraw_weights=redraw_weights)


def structural_twin(model: nn.Module) -> nn.Module:
    """:func:`~cpd_mm.comb.surgery.structural_copy` of ``model`` whose
    modules hold their hooks in dicts of their own: hooks added to the twin
    stay on the twin, and hooks added to ``model`` afterwards (gates) do not
    reach the twin or the structural copies taken from it."""
    other = structural_copy(model)
    for m in other.modules():
        for k, v in list(vars(m).items()):
            if 'hook' in k and isinstance(v, dict):
                m.__dict__[k] = type(v)(v)
    return other
