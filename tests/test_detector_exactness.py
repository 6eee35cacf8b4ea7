"""Two-stage detectors are checked on fixed proposals, so the verdict is
decisive: the RoI heads of the gated and the pruned model see the same boxes
whatever the RPN's near-tied scores do."""
import numpy as np
import pytest
import torch

import cpd_mm  # noqa: F401
from cpd_mm.comb.forward import default_forward, fixed_proposals
from equivalence import assert_equivalent
from test_comb_mmdet import build

pytest.importorskip('mmdet')


def _roi_outputs(model, x):
    with torch.no_grad():
        return [t for t in torch.utils._pytree.tree_flatten(
            default_forward(model, x)[1:])[0] if isinstance(t, torch.Tensor)]


def test_fixed_proposals_depend_on_the_size_only():
    x = torch.randn(2, 3, 96, 128)
    a, b = fixed_proposals(x), fixed_proposals(torch.zeros_like(x))
    assert torch.equal(a, b) and a.shape == (16, 4)
    assert (a[:, 0] >= 0).all() and (a[:, 2] <= 128).all()
    assert (a[:, 1] >= 0).all() and (a[:, 3] <= 96).all()
    assert (a[:, 2] > a[:, 0]).all() and (a[:, 3] > a[:, 1]).all()
    # several box scales: the RoI extractor maps them to different levels
    sides = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).sqrt()
    assert sides.max() / sides.min() > 3


def test_roi_heads_do_not_depend_on_the_rpn_scores():
    """The RoI heads' outputs are a function of the features alone. With
    the RPN's own proposals (top-k + NMS over its scores) a change of the
    scores changes which boxes the RoI heads see; between a gated and a
    pruned model float32 rounding is such a change, and near-tied scores
    then flip the proposal set (Mask/Cascade R-CNN at 256x256, seed 2)."""
    model = build('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').eval()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    before = _roi_outputs(model, x)
    with torch.no_grad():
        cls = model.rpn_head.rpn_cls
        cls.weight.add_(torch.randn(cls.weight.shape,
                                    generator=torch.Generator().manual_seed(1))
                        * 1e-2 * cls.weight.abs().max())
    after = _roi_outputs(model, x)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


@pytest.mark.parametrize('rel,seed', [
    ('cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py', 0),
    ('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py', 2),
])
def test_two_stage_detectors_exact_on_fixed_proposals(rel, seed):
    model = build(rel)
    comb, kept, pruned, diff = assert_equivalent(model, (1, 3, 128, 128),
                                                 0.5, seed=seed)
    assert (~kept).sum() > 0
    names = {g.name for g in comb.prunable_groups}
    if 'cascade' in rel:  # every stage's shared FCs are pruned
        for stage in range(3):
            assert f'roi_head.bbox_head.{stage}.shared_fcs.0' in names
    assert np.isfinite(diff)
