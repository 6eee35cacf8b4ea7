"""Parameters and FLOPs of the deployed graph (mmengine.analysis)."""
import warnings

import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn

from .wrappers import export_module

__all__ = ['inference_params', 'count_flops', 'model_complexity',
           'format_count']


def inference_params(model: nn.Module) -> int:
    """Number of parameters the exported graph uses.

    All parameters, minus those of modules that only serve training: a
    segmentor's ``auxiliary_head`` (mmseg never runs it at inference).
    """
    total = sum(p.numel() for p in model.parameters())
    aux = getattr(model, 'auxiliary_head', None)
    if isinstance(aux, nn.Module):
        total -= sum(p.numel() for p in aux.parameters())
    return int(total)


def count_flops(model: nn.Module, input_shape) -> int:
    """FLOPs of one forward pass of the exported module on ``input_shape``.

    ``input_shape`` is ``(N, C, H, W)``. Counted by mmengine's
    ``FlopAnalyzer`` (the fvcore convention: one fused multiply-add is one
    FLOP), on the same logits module that is exported, so a segmentor's final
    resize is included.
    """
    wrapper = export_module(model)
    device = next(model.parameters()).device
    x = torch.randn(*input_shape, device=device)
    analyzer = FlopAnalyzer(wrapper, (x, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        return int(analyzer.total())


def model_complexity(model: nn.Module, input_shape) -> dict:
    """``{'params': int, 'flops': int}`` for batch ``input_shape[0]``."""
    return dict(params=inference_params(model),
                flops=count_flops(model, input_shape))


def format_count(n: float) -> str:
    """Human-readable count: 1234567 -> '1.23 M'."""
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= scale:
            return f'{n / scale:.2f} {unit}'
    return f'{n:.0f}'
