"""The forward pass comb traces: every branch that training runs.

``mode='tensor'`` of OpenMMLab models skips branches that only the loss uses
(a segmentor's auxiliary heads); their inputs must shrink with the rest, so
they are traced too. A two-stage detector runs its RPN, proposals and RoI
heads on synthetic image meta information.
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


def _is_two_stage_detector(model):
    return hasattr(model, 'roi_head') and hasattr(model, 'extract_feat')


def _detection_samples(x):
    """Data samples with the meta information a detector's heads read."""
    from mmdet.structures import DetDataSample
    h, w = x.shape[-2:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
    return [DetDataSample(metainfo=meta) for _ in range(x.shape[0])]


def _two_stage_forward(model, x):
    """Backbone, neck, the RPN's maps (outputs: its anchors must stay), its
    proposals, and the RoI heads on them (box head, mask head), as the
    tensor forward of a two-stage detector runs them."""
    samples = _detection_samples(x)
    feats = model.extract_feat(x)
    outs = []
    if getattr(model, 'rpn_head', None) is not None:
        outs.append(model.rpn_head(feats))
        proposals = model.rpn_head.predict(feats, samples, rescale=False)
    else:
        raise ValueError('a two-stage detector without an RPN needs '
                         'proposals: pass forward= to comb_model')
    outs.append(model.roi_head.forward(feats, proposals, samples))
    return outs


def default_forward(model: nn.Module, x: torch.Tensor):
    """Run ``model`` on ``x`` through every branch that training runs."""
    if _is_segmentor(model):
        return _segmentor_forward(model, x)
    if _is_two_stage_detector(model):
        return _two_stage_forward(model, x)
    if hasattr(model, 'extract_feat') and hasattr(model, 'head'):
        return model(x, mode='tensor')
    return model(x)
