"""Equivalence on MMDetection detectors: single-stage heads shared across
FPN levels, and two-stage detectors through the forward training runs (RPN,
proposals, RoI heads with their shared FCs and the mask head)."""
import os.path as osp

import pytest
import torch

import cpd_mm  # noqa: F401
from equivalence import assert_equivalent

mmdet = pytest.importorskip('mmdet')


def build(rel):
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import get_installed_path
    cfg = Config.fromfile(osp.join(get_installed_path('mmdet'), '.mim',
                                   'configs', rel))
    init_default_scope('mmdet')
    mc = cfg.model
    mc.backbone.init_cfg = None
    # a narrow ResNet keeps the test fast; the structure is the same
    mc.backbone.depth = 18
    mc.neck.in_channels = [64, 128, 256, 512]
    model = MODELS.build(ConfigDict(mc))
    # zero-initialised heads stay: assert_equivalent checks a copy with
    # generic weights
    model.init_weights()
    return model


@pytest.mark.parametrize('rel', [
    'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
])
def test_two_stage_detectors(rel):
    model = build(rel)
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 96, 96), 0.5)
    names = {g.name for g in comb.prunable_groups}
    # the FPN channels reach the RoI heads through RoIAlign: prunable
    fpn = comb.group('neck.fpn_convs.0.conv')
    assert fpn.prunable and 'roi_head.bbox_head.shared_fcs.0' in \
        fpn.consumers
    assert 'roi_head.bbox_head.shared_fcs.0' in names
    # RoI feature width follows the pruning
    kept_fpn = int(kept[fpn.channels].sum())
    assert pruned.roi_head.bbox_roi_extractor.out_channels == kept_fpn
    if 'mask' in rel:
        assert 'roi_head.mask_head.convs.0.conv' in names
        assert pruned.roi_head.mask_roi_extractor.out_channels == kept_fpn


@pytest.mark.parametrize('rel', [
    'retinanet/retinanet_r50_fpn_1x_coco.py',
    'fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
])
def test_single_stage_heads_shared_across_levels(rel):
    model = build(rel)
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 96, 96), 0.5)
    g = comb.group('bbox_head.cls_convs.0.conv')
    # one set of channels for the five levels that share the conv
    assert g.prunable and g.producers.count('bbox_head.cls_convs.0.conv') == 5
