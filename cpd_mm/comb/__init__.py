"""Comb: trace any model and find its coupled channel groups.

Example::

    from cpd_mm.comb import comb_model
    result = comb_model(model, input_shape=(1, 3, 224, 224))
    for g in result.prunable_groups:
        print(g.name, g.size, g.granularity)
"""
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .groups import ChannelGroup, CombResult
from .tracer import CombTracer, default_forward

__all__ = ['comb_model', 'ChannelGroup', 'CombResult', 'default_forward']


def comb_model(model: nn.Module,
               input_shape: Sequence[int] = (1, 3, 224, 224),
               example_inputs: Optional[torch.Tensor] = None,
               forward: Optional[Callable] = None,
               exclude: Sequence[str] = ()) -> CombResult:
    """Trace ``model`` on one example input and return its channel groups.

    Args:
        model: any ``nn.Module`` (MMPretrain classifiers and MMSegmentation
            segmentors are run through their tensor paths, auxiliary heads
            included; see :func:`default_forward`).
        input_shape: shape of the random example input (channel structure
            does not depend on resolution, so keep it small).
        example_inputs: a tensor to use instead of a random one.
        forward: ``forward(model, x)`` to call instead of the default.
        exclude: module names whose output channels must never be pruned
            (the model's outputs are always excluded).

    The model is traced in eval mode and restored to its previous mode.
    """
    if example_inputs is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else 'cpu'
        example_inputs = torch.randn(*input_shape, device=device)
    was_training = model.training
    model.eval()
    try:
        tracer = CombTracer(model).run(example_inputs, forward)
    finally:
        model.train(was_training)
    for name in exclude:
        rec = tracer.records.get(name)
        if rec is None:
            raise ValueError(f'exclude: {name!r} is not a traced conv/linear '
                             'module of this model')
        tracer.freeze(rec.get('out', rec.get('in')), f'excluded by user: {name}')
    result = CombResult(tracer, list(example_inputs.shape))
    result.uncalled = [n for n, m in model.named_modules()
                       if any(True for _ in m.parameters(recurse=False))
                       and tracer.calls.get(n, 0) == 0]
    return result
