"""Distillation keeps working after pruning shrinks the student physically.

Each test combs the student of a demo model (configs/demo/*), removes a
random set of prunable channels, computes the distillation losses with the
student *gated* (ChannelGates), then prunes the student in place,
calls ``follow_student_shrink`` and computes them again on the same batch.
The student is re-drawn to generic weights so that no loss is trivially 0.
"""
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData, PixelData

from cpd_mm.comb import ChannelGates, comb_model, prune_model, redraw_
from cpd_mm.comb.surgery import structural_copy
from cpd_mm.distill import (ChannelWiseDivergence, CPDDistiller,
                            KLDivergence)
from cpd_mm.distill.shrink import base_keep_from_comb
from cpd_mm.distill.sources import record

RTOL = 1e-5


def build(config, scope, distill, seed=0):
    """A distiller on the demo model of ``config`` (teacher='self') whose
    student is then re-drawn: student and teacher differ, losses are > 0."""
    cfg = Config.fromfile(config)
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(seed)
        distiller = CPDDistiller(student=cfg.model, teacher='self',
                                 distill=distill)
    redraw_(distiller.student, seed=seed + 1)
    return distiller.eval()  # no dropout: gated and pruned see the same


def random_kept(comb, seed=0):
    """Remove a random part (at least one, never all) of every prunable
    group's free channels; every producer keeps one output."""
    rng = np.random.default_rng(seed)
    kept = np.ones(comb.num_channels, dtype=bool)
    for g in comb.prunable_groups:
        free = np.nonzero(~g.frozen)[0]
        n = int(rng.integers(1, len(free)))
        kept[g.channels[rng.choice(free, n, replace=False)]] = False
    return kept | comb.one_per_producer(kept, rng.random(comb.num_channels))


def gated_then_shrunk(distiller, comb, kept, data, sources=(),
                      follow=True):
    """Losses (and the recorded student and teacher ``sources``) with the
    student gated, then with it pruned in place and followed."""
    state = {k: v.clone() for k, v in
             distiller.distill_losses.state_dict().items()}
    gates = ChannelGates(distiller.student, comb)
    gates.set_kept(kept)
    with torch.no_grad(), record(distiller.student, sources) as s_out, \
            record(distiller.teacher, sources) as t_out:
        gated = distiller.loss(**data)
    gates.remove()
    # the same memories and sampling step for the second pass
    distiller.distill_losses.load_state_dict(state)
    prune_model(distiller.student, comb, kept)
    if follow:
        distiller.follow_student_shrink(base_keep_from_comb(comb, kept))
    with torch.no_grad():
        shrunk = distiller.loss(**data)
    return gated, shrunk, s_out, t_out


def assert_close(a, b):
    assert float(a) == pytest.approx(float(b), rel=RTOL, abs=1e-7)


# --------------------------------------------------------------- data ---
def seg_data(n=2, size=64, classes=5):
    g = torch.Generator().manual_seed(0)
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(n):
        label = torch.randint(0, classes, (1, size, size), generator=g)
        label[:, :4] = 255
        samples.append(SegDataSample(
            gt_sem_seg=PixelData(data=label),
            metainfo=dict(img_shape=(size, size), ori_shape=(size, size))))
    inputs = [torch.randint(0, 256, (3, size, size), generator=g,
                            dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=inputs, data_samples=samples)


def cls_data(n=2, size=32, classes=6):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(0)
    return dict(
        inputs=[torch.randint(0, 256, (3, size, size), generator=g,
                              dtype=torch.uint8) for _ in range(n)],
        data_samples=[DataSample().set_gt_label(i % classes)
                      for i in range(n)])


def det_data(n=2, size=64):
    from mmdet.structures import DetDataSample
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[4.0, 6.0, 30.0, 34.0],
                                 [30.0, 20.0, 60.0, 50.0]]),
            labels=torch.tensor([i % 4, 2]))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, size, size), generator=g,
                            dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=inputs, data_samples=samples)


SEG = 'configs/demo/pspnet_r18_demo-seg.py'
CLS = 'configs/demo/resnet18_demo-cls.py'
DET = 'configs/demo/rtmdet_demo-det.py'


# ---------------------------------------------------------- io_channels ---
def test_io_channels_of_a_neck_and_an_input():
    pytest.importorskip('mmdet')
    d = build(DET, 'mmdet', 'none')
    comb = comb_model(d.student, input_shape=(1, 3, 64, 64), verify=False)
    levels = comb.io_channels('neck', 'output')
    assert len(levels) == 1 and len(levels[0]) == 3  # one call, 3 levels
    outs = d.student.extract_feat(torch.randn(1, 3, 64, 64))
    for level, ((axis, ids), out) in enumerate(zip(levels[0], outs)):
        assert axis == 1 and ids.shape == (out.shape[1], ) and \
            (ids >= 0).all()
        # the channels of the conv that makes the level, and those the
        # head's first conv (shared by the levels: one call each) reads
        conv = comb.records[f'neck.out_convs.{level}.conv']
        assert np.array_equal(ids, comb.channels(conv.outputs))
        [(axis_in, ids_in)] = comb.io_channels(
            'bbox_head.cls_convs.0.0.conv', 'input')[level]
        assert axis_in == 1 and np.array_equal(ids_in, ids)
    # the first positional input of a leaf: the ':input' source kind
    conv_in = comb.io_channels('neck.out_convs.0.conv', 'input')
    assert np.array_equal(conv_in[0][0][1], comb.channels(
        comb.records['neck.out_convs.0.conv'].inputs))
    # the image: no channel; a module never called; a bad kind
    assert comb.io_channels('backbone', 'input') == [[None]]
    assert comb.io_channels('no.such.module', 'output') == []
    with pytest.raises(ValueError, match="kind must be 'input' or"):
        comb.io_channels('neck', 'outputs')


# ------------------------------------------------- connector: CIRKD ---
def test_cirkd_connector_is_sliced_and_kl_on_logits_is_unchanged():
    d = build(SEG, 'mmseg', 'cirkd')
    cirkd = d.distill_losses[1]
    comb = comb_model(d.student, input_shape=(1, 3, 64, 64), verify=False)
    kept = random_kept(comb)
    base_keep = base_keep_from_comb(comb, kept)
    [[mask]] = base_keep('decode_head.dropout', 'input')  # pre_logits
    assert mask is not None and 0 < mask.sum() < mask.size == 32
    data = d.data_preprocessor(seg_data(), True)
    gated, shrunk, _, _ = gated_then_shrunk(d, comb, kept, data)
    # the connector follows, the teacher keeps its width
    assert cirkd.student_channels == mask.sum()
    assert cirkd.project_head[0].weight.shape == (32, mask.sum(), 1, 1)
    assert cirkd.teacher_channels == 32
    for term in ('kl', 'cirkd_minibatch_p2p', 'cirkd_memory_p2p',
                 'cirkd_memory_p2r'):
        assert float(gated[f'loss_kd_{term}']) > 0, term
        assert_close(shrunk[f'loss_kd_{term}'], gated[f'loss_kd_{term}'])
    assert_close(shrunk['decode.loss_ce'], gated['decode.loss_ce'])

    # resume: a fresh distiller, its student pruned to the plan, followed,
    # then loads the shrunk one's checkpoint (strict) and computes the same
    again = build(SEG, 'mmseg', 'cirkd')
    prune_model(again.student, comb, kept)
    again.follow_student_shrink(base_keep)
    again.load_state_dict(d.state_dict(), strict=True)
    state = {k: v.clone() for k, v in d.distill_losses.state_dict().items()}
    with torch.no_grad():
        first = d.loss(**data)
        again_losses = again.loss(**data)
    for k in first:
        assert_close(again_losses[k], first[k])
    d.distill_losses.load_state_dict(state)
    # following the same masks again changes nothing (they are absolute)
    weight = cirkd.project_head[0].weight
    d.follow_student_shrink(base_keep)
    assert cirkd.project_head[0].weight is weight


def test_cirkd_connector_follows_successive_masks():
    """Two shrinks (absolute masks, the second removing more) slice the
    connector as one shrink to the second mask does; masks that bring
    channels back are refused."""
    d1, d2 = (build(SEG, 'mmseg', 'cirkd') for _ in range(2))
    rng = np.random.default_rng(3)
    first = rng.random(32) < 0.7
    second = first & (rng.random(32) < 0.7)
    assert first.sum() > second.sum() > 0

    def masks(m):
        return lambda path, kind: [[m]] if path == 'decode_head.dropout' \
            else []
    d1.follow_student_shrink(masks(first))
    d1.follow_student_shrink(masks(second))
    d2.follow_student_shrink(masks(second))
    w1, w2 = (d.distill_losses[1].project_head[0].weight for d in (d1, d2))
    assert w1.shape == (32, second.sum(), 1, 1) and torch.equal(w1, w2)
    assert w1.requires_grad
    with pytest.raises(ValueError, match='can only remove more'):
        d1.follow_student_shrink(masks(first))
    # a mask that also removes logits is refused before anything changes
    # (the logits item comes after the connector's)
    logits = np.ones(5, dtype=bool)
    logits[0] = False

    def with_logits(path, kind):
        return [[logits]] if path == 'decode_head.conv_seg' else \
            masks(first)(path, kind)
    fresh = build(SEG, 'mmseg', [
        dict(type='CIRKDLoss', student='pre_logits', teacher='pre_logits'),
        dict(type='KLDivergence', student='logits', teacher='logits')])
    with pytest.raises(ValueError, match='never pruned'):
        fresh.follow_student_shrink(with_logits)
    assert fresh.distill_losses[0].student_channels == 32 and not \
        fresh._shrunk


def test_follow_leaves_copies_alone_and_keeps_the_teacher():
    """The shrink probes surgery on structural copies of the distiller
    (shared attributes): following there must not touch the original. After
    a shrink the 'self' teacher keeps the original width and weights:
    ``init_weights`` (a resumed run calls it) does not copy the student
    into it, and ``sync_teacher`` refuses."""
    d = build(SEG, 'mmseg', 'cirkd')
    keep = np.arange(32) % 3 != 0

    def base_keep(path, kind):
        return [[keep]] if path == 'decode_head.dropout' else []
    probe = structural_copy(d)
    probe.follow_student_shrink(base_keep)
    assert probe.distill_losses[1].project_head[0].weight.shape[1] == 21
    assert d.distill_losses[1].project_head[0].weight.shape[1] == 32
    assert not d._shrunk
    d.follow_student_shrink(base_keep)
    assert d.distill_losses[1].project_head[0].weight.shape[1] == 21
    teacher = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.init_weights()
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    with pytest.raises(RuntimeError, match='student was shrunk'):
        d.sync_teacher()


# ------------------------------------------ channel by channel: CWD, KL ---
def test_cwd_on_fpn_levels_is_the_gated_loss_on_kept_channels():
    pytest.importorskip('mmdet')
    d = build(DET, 'mmdet', 'cwd')  # CWD on each level of the neck
    comb = comb_model(d.student, input_shape=(1, 3, 64, 64), verify=False)
    kept = random_kept(comb, seed=1)
    [masks] = base_keep_from_comb(comb, kept)('neck', 'output')
    assert len(masks) == 3 and all(m is not None for m in masks)
    data = d.data_preprocessor(det_data(), True)
    gated, shrunk, s_out, t_out = gated_then_shrunk(
        d, comb, kept, data, sources=['neck'])
    cwd = ChannelWiseDivergence(tau=1.0, loss_weight=10.0)
    [feats_s], [feats_t] = s_out['neck'], t_out['neck']
    pos = [torch.as_tensor(np.flatnonzero(m)) for m in masks]
    on_kept = sum(cwd(s[:, p], t[:, p])
                  for s, t, p in zip(feats_s, feats_t, pos))
    full = sum(cwd(s, t) for s, t in zip(feats_s, feats_t))
    assert_close(gated['loss_kd_cwd'], full)
    assert_close(shrunk['loss_kd_cwd'], on_kept)
    assert abs(float(on_kept) / float(full) - 1) > 1e-3  # not the same
    for a, b in zip(shrunk['loss_cls'], gated['loss_cls']):  # per level
        assert_close(a, b)


def test_kl_on_features_is_the_gated_loss_on_kept_channels():
    d = build(CLS, 'mmpretrain', [
        dict(type='KLDivergence', name='kl', student='logits',
             teacher='logits'),
        dict(type='KLDivergence', name='feat', student='pre_logits',
             teacher='pre_logits', tau=2.0)])
    comb = comb_model(d.student, input_shape=(1, 3, 32, 32), verify=False)
    kept = random_kept(comb, seed=2)
    [[mask]] = base_keep_from_comb(comb, kept)('head.fc', 'input')
    assert mask is not None and 0 < mask.sum() < mask.size
    data = d.data_preprocessor(cls_data(), True)
    gated, shrunk, s_out, t_out = gated_then_shrunk(
        d, comb, kept, data, sources=['pre_logits'])
    [feat_s], [feat_t] = s_out['pre_logits'], t_out['pre_logits']
    pos = torch.as_tensor(np.flatnonzero(mask))
    on_kept = KLDivergence(tau=2.0)(feat_s[:, pos], feat_t[:, pos])
    assert_close(shrunk['loss_kd_feat'], on_kept)
    # the removed channels counted in the gated softmax
    assert abs(float(on_kept) / float(gated["loss_kd_feat"]) - 1) > 10 * RTOL
    assert float(gated['loss_kd_kl']) > 0
    assert_close(shrunk['loss_kd_kl'], gated['loss_kd_kl'])


# ----------------------------------------------------- errors, no-ops ---
def test_logits_never_shrink_and_unfollowed_distiller_is_unchanged():
    d = build(CLS, 'mmpretrain', 'kl')
    keys = list(d.state_dict())
    data = d.data_preprocessor(cls_data(), True)
    with torch.no_grad():
        before = d.loss(**data)['loss_kd_kl']
    # nothing removed: nothing changes
    d.follow_student_shrink(lambda path, kind: [[None]])
    with torch.no_grad():
        assert torch.equal(d.loss(**data)['loss_kd_kl'], before)
    assert list(d.state_dict()) == keys and not d._shrunk
    mask = np.ones(6, dtype=bool)
    mask[2] = False
    with pytest.raises(ValueError, match="logits .*never pruned"):
        d.follow_student_shrink(lambda path, kind: [[mask]])


def test_cwd_without_follow_names_the_shapes():
    """Pruned but not followed: the channel-wise loss refuses clearly."""
    d = build(SEG, 'mmseg', [
        dict(type='ChannelWiseDivergence', name='cwd',
             student='decode_head.bottleneck',
             teacher='decode_head.bottleneck')])
    comb = comb_model(d.student, input_shape=(1, 3, 64, 64), verify=False)
    prune_model(d.student, comb, random_kept(comb))
    with pytest.raises(ValueError, match='different channel numbers'):
        d.loss(**d.data_preprocessor(seg_data(), True))
