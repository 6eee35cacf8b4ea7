"""Distillation for detectors: the binary KL loss by hand, and CPDDistiller
on real MMDetection detectors (RetinaNet, RTMDet, Faster R-CNN)."""
import math

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import DefaultScope

pytest.importorskip('mmdet')
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from cpd_mm.distill import (BinaryKLDivergence, ChannelWiseDivergence,  # noqa
                            CPDDistiller, build_distill_cfg)
from cpd_mm.distill.sources import resolve_source  # noqa: E402


def bernoulli_kl(zs, zt, tau=1.0):
    """KL(Bern(sigmoid(zt/tau)) || Bern(sigmoid(zs/tau))), by hand."""
    ps, pt = 1 / (1 + math.exp(-zs / tau)), 1 / (1 + math.exp(-zt / tau))
    return pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))


# two levels of a head with 2 priors x 2 classes: (N=1, 4, H, W)
LEVEL0_S = [[[0.5, -1.0]], [[2.0, 0.0]], [[-3.0, 1.0]], [[0.2, 0.3]]]
LEVEL0_T = [[[1.5, -2.0]], [[0.0, 0.0]], [[-1.0, 4.0]], [[0.2, -0.3]]]
LEVEL1_S = [[[1.0]], [[-0.5]], [[0.0]], [[3.0]]]
LEVEL1_T = [[[-1.0]], [[-0.5]], [[2.0]], [[1.0]]]


def _flat(level):
    return [v for channel in level for row in channel for v in row]


@pytest.mark.parametrize('tau', [1.0, 2.0])
@pytest.mark.parametrize('normalizer', ['teacher', 'anchors'])
def test_binary_kl_matches_hand_computation(tau, normalizer):
    s = [torch.tensor([LEVEL0_S]), torch.tensor([LEVEL1_S])]
    t = [torch.tensor([LEVEL0_T]), torch.tensor([LEVEL1_T])]
    pairs = list(zip(_flat(LEVEL0_S) + _flat(LEVEL1_S),
                     _flat(LEVEL0_T) + _flat(LEVEL1_T)))
    total = sum(bernoulli_kl(zs, zt, tau) for zs, zt in pairs)
    if normalizer == 'teacher':  # expected number of positives
        norm = max(sum(1 / (1 + math.exp(-zt / tau)) for _, zt in pairs), 1)
    else:  # anchors: 2 positions x 2 priors + 1 position x 2 priors
        norm = 6
    loss = BinaryKLDivergence(num_classes=2, tau=tau, loss_weight=0.5,
                              normalizer=normalizer)(s, t)
    assert loss.item() == pytest.approx(0.5 * tau**2 * total / norm,
                                        rel=1e-5)


def test_binary_kl_zero_at_teacher_and_gradient_is_soft_bce():
    z_t = torch.randn(2, 6, 3, 3)
    z_s = z_t.clone().requires_grad_()
    loss_fn = BinaryKLDivergence(num_classes=3, normalizer='anchors')
    loss = loss_fn(z_s, z_t)
    assert abs(loss.item()) < 1e-6
    z_s = (z_t + torch.randn_like(z_t)).requires_grad_()
    t = z_t.clone().requires_grad_()
    loss_fn(z_s, t).backward()
    anchors = 2 * 2 * 3 * 3  # N x priors x H x W
    expected = (torch.sigmoid(z_s) - torch.sigmoid(z_t)) / anchors
    torch.testing.assert_close(z_s.grad, expected.detach())
    assert t.grad is None  # the teacher is detached


def test_binary_kl_rejects_bad_inputs():
    loss_fn = BinaryKLDivergence(num_classes=3)
    with pytest.raises(ValueError, match='multiple of num_classes=3'):
        loss_fn(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match='differ in shape'):
        loss_fn(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match='2 student levels but 1'):
        loss_fn([torch.zeros(1, 3, 2, 2)] * 2, [torch.zeros(1, 3, 2, 2)])
    with pytest.raises(ValueError, match='normalizer'):
        BinaryKLDivergence(num_classes=3, normalizer='mean')


def test_detection_presets():
    assert [(d['type'], d['student']) for d in build_distill_cfg(
        'kl', 'mmdet')] == [('BinaryKLDivergence', 'logits')]
    assert [(d['type'], d['student'], d['loss_weight']) for d in
            build_distill_cfg('cwd', 'mmdet')] == [
                ('ChannelWiseDivergence', 'neck', 10.0)]
    with pytest.raises(ValueError, match='for segmentors'):
        build_distill_cfg('cirkd', 'mmdet')


# ------------------------------------------------------ real detectors ---
def retinanet_cfg(num_classes=3):
    return ConfigDict(  # as read from a file: mmdet reads test_cfg.nms
        type='RetinaNet',
        data_preprocessor=dict(type='DetDataPreprocessor',
                               mean=[0., 0., 0.], std=[255., 255., 255.],
                               pad_size_divisor=32),
        backbone=dict(type='ResNet', depth=18, base_channels=8,
                      stem_channels=8, out_indices=(1, 2, 3),
                      norm_cfg=dict(type='BN')),
        neck=dict(type='FPN', in_channels=[16, 32, 64], out_channels=16,
                  start_level=0, add_extra_convs='on_input', num_outs=4),
        bbox_head=dict(
            type='RetinaHead', num_classes=num_classes, in_channels=16,
            stacked_convs=1, feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator',
                                  octave_base_scale=4, scales_per_octave=2,
                                  ratios=[1.0], strides=[8, 16, 32, 64]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder'),
            loss_cls=dict(type='FocalLoss', use_sigmoid=True),
            loss_bbox=dict(type='L1Loss')),
        train_cfg=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5,
                          neg_iou_thr=0.4, min_pos_iou=0),
            sampler=dict(type='PseudoSampler'), allowed_border=-1,
            pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, score_thr=0.05, max_per_img=10,
                      nms=dict(type='nms', iou_threshold=0.5)))


def rtmdet_cfg(num_classes=3):
    return ConfigDict(
        type='RTMDet',
        data_preprocessor=dict(type='DetDataPreprocessor',
                               mean=[0., 0., 0.], std=[255., 255., 255.],
                               pad_size_divisor=32),
        backbone=dict(type='CSPNeXt', deepen_factor=0.167,
                      widen_factor=0.125),
        neck=dict(type='CSPNeXtPAFPN', in_channels=[32, 64, 128],
                  out_channels=16, num_csp_blocks=1),
        bbox_head=dict(
            type='RTMDetSepBNHead', num_classes=num_classes, in_channels=16,
            feat_channels=16, stacked_convs=1, with_objectness=False,
            anchor_generator=dict(type='MlvlPointGenerator', offset=0,
                                  strides=[8, 16, 32]),
            bbox_coder=dict(type='DistancePointBBoxCoder'),
            loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True,
                          beta=2.0),
            loss_bbox=dict(type='GIoULoss', loss_weight=2.0)),
        train_cfg=dict(assigner=dict(type='DynamicSoftLabelAssigner',
                                     topk=13),
                       allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=100, score_thr=0.05, max_per_img=10,
                      nms=dict(type='nms', iou_threshold=0.6)))


@pytest.fixture
def det_scope():
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield


def det_data(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[4.0, 6.0, 30.0, 34.0],
                                 [30.0, 20.0, 60.0, 50.0]]),
            labels=torch.tensor([i % 3, 2]))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, size, size), generator=g,
                            dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=inputs, data_samples=samples)


def _perturbed(distiller):
    """Move the student away from the teacher (KD > 0 afterwards)."""
    with torch.no_grad():
        for p in distiller.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return distiller


@pytest.mark.parametrize('cfg,paths', [
    (retinanet_cfg, ['bbox_head.retina_cls']),
    (rtmdet_cfg, ['bbox_head.rtm_cls.0', 'bbox_head.rtm_cls.1',
                  'bbox_head.rtm_cls.2']),
])
def test_detector_kl_is_binary_kl_of_all_levels(det_scope, cfg, paths):
    distiller = _perturbed(CPDDistiller(student=cfg(), distill='kl'))
    assert [p for p, _ in resolve_source(distiller.student, 'logits')] == \
        paths
    assert distiller.distill_losses[0].num_classes == 3
    distiller.train()
    data = distiller.data_preprocessor(det_data(), True)
    losses = distiller.loss(**data)
    assert {'loss_cls', 'loss_bbox', 'loss_kd_kl'} <= set(losses)
    # the same maps through the detectors' own tensor forward
    cls_s, _ = distiller.student(data['inputs'], mode='tensor')
    with torch.no_grad():
        cls_t, _ = distiller.teacher(data['inputs'], mode='tensor')
    assert len(cls_s) == len(cls_t) == (4 if 'retina' in paths[0] else 3)
    expected = BinaryKLDivergence(num_classes=3)(cls_s, cls_t)
    assert losses['loss_kd_kl'].item() == pytest.approx(expected.item(),
                                                        rel=1e-5)
    assert losses['loss_kd_kl'].item() > 0
    losses['loss_kd_kl'].backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_detector_cwd_sums_levels_of_the_neck(det_scope):
    distiller = _perturbed(CPDDistiller(student=retinanet_cfg(),
                                        distill='cwd'))
    distiller.train()
    data = distiller.data_preprocessor(det_data(), True)
    losses = distiller.loss(**data)
    feats_s = distiller.student.extract_feat(data['inputs'])
    with torch.no_grad():
        feats_t = distiller.teacher.extract_feat(data['inputs'])
    assert len(feats_s) == 4
    cwd = ChannelWiseDivergence(tau=1.0, loss_weight=10.0)
    expected = sum(cwd(s, t) for s, t in zip(feats_s, feats_t))
    assert losses['loss_kd_cwd'].item() == pytest.approx(expected.item(),
                                                         rel=1e-5)
    # a full train step updates the student and not the teacher
    teacher = {k: v.clone() for k, v in distiller.teacher.state_dict().items()}
    optim = OptimWrapper(torch.optim.SGD(distiller.parameters(), lr=0.01))
    log_vars = distiller.train_step(det_data(), optim)
    assert log_vars['loss_kd_cwd'] > 0
    for k, v in distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    distiller.eval()
    with torch.no_grad():
        out = distiller.val_step(det_data())
    assert 'bboxes' in out[0].pred_instances


def test_two_stage_detector_needs_named_sources(det_scope):
    cfg = dict(
        type='FasterRCNN',
        data_preprocessor=dict(type='DetDataPreprocessor'),
        backbone=dict(type='ResNet', depth=18, base_channels=8,
                      stem_channels=8, out_indices=(1, 2, 3)),
        neck=dict(type='FPN', in_channels=[16, 32, 64], out_channels=16,
                  num_outs=3),
        rpn_head=dict(
            type='RPNHead', in_channels=16, feat_channels=16,
            anchor_generator=dict(type='AnchorGenerator', scales=[8],
                                  ratios=[1.0], strides=[8, 16, 32]),
            bbox_coder=dict(type='DeltaXYWHBBoxCoder')),
        roi_head=dict(
            type='StandardRoIHead',
            bbox_roi_extractor=dict(
                type='SingleRoIExtractor', out_channels=16,
                featmap_strides=[8, 16, 32],
                roi_layer=dict(type='RoIAlign', output_size=7,
                               sampling_ratio=0)),
            bbox_head=dict(type='Shared2FCBBoxHead', in_channels=16,
                           fc_out_channels=32, num_classes=3)),
        train_cfg=None,
        test_cfg=ConfigDict(
            rpn=dict(nms_pre=100, max_per_img=50, min_bbox_size=0,
                     nms=dict(type='nms', iou_threshold=0.7)),
            rcnn=dict(score_thr=0.05, max_per_img=10,
                      nms=dict(type='nms', iou_threshold=0.5))))
    with pytest.raises(ValueError, match='two-stage detector'):
        CPDDistiller(student=cfg, distill='kl')
    cwd = CPDDistiller(student=cfg, distill='cwd')  # FPN levels: fine
    assert cwd.distill_specs[0]['student'] == 'neck'
