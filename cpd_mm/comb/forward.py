"""The forward pass comb traces: every branch that training runs.

``mode='tensor'`` of OpenMMLab models skips branches that only the loss uses
(a segmentor's auxiliary heads); their inputs must shrink with the rest, so
they are traced too. A two-stage detector runs its RPN and its RoI heads on
fixed proposals and synthetic image meta information.
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


def fixed_proposals(x, per_image=None):
    """The same boxes for every image of ``x``, from its size alone: three
    scales (a quarter, half and 7/8 of the shorter side) on a 3x3, 2x2 and
    1x1 grid of centres, plus a tall and a wide box: 16 boxes (x1, y1, x2,
    y2) reaching the finest FPN levels and, at 224 and above, the coarser
    ones. Comb's tracing and every exactness check feed these instead of the
    RPN's own proposals: RPN proposals come from a top-k and an NMS over
    scores, so two models that agree to rounding can select different boxes
    (near-tied scores) and the RoI heads would be compared on different
    inputs."""
    h, w = (int(v) for v in x.shape[-2:])
    side = min(h, w)
    boxes = []
    for frac, k in ((0.25, 3), (0.5, 2), (0.875, 1)):
        bw = bh = frac * side
        for i in range(k):
            for j in range(k):
                cx = (j + 1) * w / (k + 1)
                cy = (i + 1) * h / (k + 1)
                boxes.append((cx - bw / 2, cy - bh / 2, cx + bw / 2,
                              cy + bh / 2))
    for bw, bh in ((0.25 * side, 0.75 * side), (0.75 * side, 0.25 * side)):
        boxes.append(((w - bw) / 2, (h - bh) / 2, (w + bw) / 2,
                      (h + bh) / 2))
    t = torch.tensor(boxes, dtype=x.dtype, device=x.device)
    t[:, 0::2] = t[:, 0::2].clamp(0, w)
    t[:, 1::2] = t[:, 1::2].clamp(0, h)
    return t


def _two_stage_forward(model, x):
    """Backbone, neck, the RPN's maps (outputs: its anchors must stay), and
    the RoI heads (box head, cascade stages, mask head) on
    :func:`fixed_proposals`, as the tensor forward of a two-stage detector
    runs them. The RPN's own proposal selection carries no channel (boxes
    only), so it is not part of the channel structure; leaving it out makes
    the RoI heads' outputs a function of the weights alone, which is what an
    exactness check compares."""
    from mmengine.structures import InstanceData
    samples = _detection_samples(x)
    feats = model.extract_feat(x)
    outs = []
    if getattr(model, 'rpn_head', None) is not None:
        outs.append(model.rpn_head(feats))
    boxes = fixed_proposals(x)
    proposals = []
    for _ in range(x.shape[0]):
        p = InstanceData()
        p.bboxes = boxes.clone()
        proposals.append(p)
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
