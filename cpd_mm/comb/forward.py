"""The forward pass comb traces: every branch that training runs.

``mode='tensor'`` of OpenMMLab models skips branches that only the loss uses
(a segmentor's auxiliary heads); their inputs must shrink with the rest, so
they are traced too.
"""
import torch
import torch.nn as nn


def _is_segmentor(model):
    return hasattr(model, 'decode_head') and hasattr(model, 'extract_feat')


def _segmentor_forward(model, x):
    """The decode head(s) as the segmentor runs them (a cascade of heads
    included), then the auxiliary heads on the same features."""
    feats = []
    own = 'extract_feat' in vars(model)
    original = model.extract_feat

    def extract(inputs):
        f = original(inputs)
        feats.append(f)
        return f

    model.extract_feat = extract
    try:
        if hasattr(model, '_forward'):
            outs = [model._forward(x)]
        else:
            outs = [model(x, mode='tensor')]
    finally:
        if own:
            model.extract_feat = original
        else:
            del model.extract_feat
    aux = getattr(model, 'auxiliary_head', None)
    if aux is not None and feats:
        heads = aux if isinstance(aux, nn.ModuleList) else [aux]
        outs += [h.forward(feats[0]) for h in heads]
    return outs


def default_forward(model: nn.Module, x: torch.Tensor):
    """Run ``model`` on ``x`` through every branch that training runs."""
    if _is_segmentor(model):
        return _segmentor_forward(model, x)
    if hasattr(model, 'extract_feat') and hasattr(model, 'head'):
        return model(x, mode='tensor')
    return model(x)
