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

from .forward import default_forward
from .gates import ChannelGates
from .generic import generic_copy, redraw_
from .groups import ChannelGroup, CombResult
from .handlers import PrunedMultiheadAttention
from .surgery import prune_model
from .tracer import CombTracer
from .verify import Verification, verify_comb

__all__ = ['comb_model', 'ChannelGroup', 'CombResult', 'ChannelGates',
           'prune_model', 'default_forward', 'verify_comb', 'Verification',
           'PrunedMultiheadAttention', 'generic_copy', 'redraw_']


def comb_model(model: nn.Module,
               input_shape: Sequence[int] = (1, 3, 224, 224),
               example_inputs: Optional[torch.Tensor] = None,
               forward: Optional[Callable] = None,
               exclude: Sequence[str] = (),
               verify: bool = True,
               logger: Optional[Callable[[str], None]] = None) -> CombResult:
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
        verify: check every prunable group with random plans (gated vs
            physically pruned outputs, on a copy with generic weights) and
            freeze the groups that fail, with the reason; a forward that is
            not deterministic freezes every group, with the advice (see
            :mod:`cpd_mm.comb.verify`); the report is
            ``result.verification``.
        logger: ``logger(message)`` for what verification freezes.

    The model is traced in eval mode and restored to its previous mode; it
    is not modified.
    """
    if example_inputs is None:
        p = next(iter(model.parameters()), None)
        kw = dict(device=p.device, dtype=p.dtype) if p is not None and \
            p.is_floating_point() else {}
        # a private generator: the same input on every rank and run, and the
        # user's random stream is left alone
        gen = torch.Generator().manual_seed(0)
        example_inputs = torch.randn(*input_shape, generator=gen).to(**kw)
    was_training = model.training
    model.eval()
    try:
        tracer = CombTracer(model).run(example_inputs, forward)
        for name in exclude:
            rec = tracer.records.get(name)
            atoms = getattr(rec, 'outputs', None)
            if atoms is None:
                raise ValueError(f'exclude: {name!r} is not a traced conv/'
                                 'linear module of this model')
            tracer.freeze(atoms, f'excluded by user: {name}')
        result = CombResult(tracer, list(example_inputs.shape))
        result.uncalled = [n for n, m in model.named_modules()
                           if any(True for _ in m.parameters(recurse=False))
                           and tracer.calls.get(n, 0) == 0]
        if verify:
            result.verification = verify_comb(model, result, example_inputs,
                                              forward, logger=logger)
    finally:
        model.train(was_training)
    return result
