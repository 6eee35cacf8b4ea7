"""CPDDistiller with a small ImageClassifier and a small EncoderDecoder."""
import copy

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.optim import OptimWrapper
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import load_checkpoint
from mmengine.structures import PixelData
from mmpretrain.structures import DataSample
from mmseg.structures import SegDataSample

from cpd_mm.distill import (CPDDistiller, build_distill_cfg,
                            is_distill_state_dict, student_state_dict)


def cls_cfg(width=8):
    return dict(
        type='ImageClassifier',
        data_preprocessor=dict(type='ClsDataPreprocessor', num_classes=5,
                               mean=[0., 0., 0.], std=[255., 255., 255.]),
        backbone=dict(type='ResNet', depth=18, stem_channels=width,
                      base_channels=width),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5,
                  in_channels=8 * width))


def seg_cfg(channels=16):
    bn = dict(type='BN', requires_grad=True)
    return ConfigDict(  # as read from a config file: test_cfg.mode works
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', size=(32, 32),
                               mean=[0., 0., 0.], std=[255., 255., 255.],
                               pad_val=0, seg_pad_val=255),
        backbone=dict(type='ResNetV1c', depth=18, stem_channels=8,
                      base_channels=8, dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=bn),
        decode_head=dict(type='PSPHead', in_channels=64, in_index=3,
                         channels=channels, pool_scales=(1, 2),
                         dropout_ratio=0.1, num_classes=4, norm_cfg=bn,
                         align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss')),
        train_cfg=dict(), test_cfg=dict(mode='whole'))


@pytest.fixture
def cls_scope():
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        yield


@pytest.fixture
def seg_scope():
    with DefaultScope.overwrite_default_scope('mmseg'):
        yield


def cls_data(n=2):
    g = torch.Generator().manual_seed(0)
    return dict(
        inputs=[torch.randint(0, 256, (3, 32, 32), generator=g,
                              dtype=torch.uint8) for _ in range(n)],
        data_samples=[DataSample().set_gt_label(i % 5) for i in range(n)])


def seg_data(n=2):
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        label = torch.randint(0, 4, (1, 32, 32), generator=g)
        label[:, :4] = 255
        samples.append(SegDataSample(
            gt_sem_seg=PixelData(data=label),
            metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32))))
    inputs = [torch.randint(0, 256, (3, 32, 32), generator=g,
                            dtype=torch.uint8) for _ in range(n)]
    return dict(inputs=inputs, data_samples=samples)


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def sgd(model):
    return OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1,
                                        momentum=0.9, weight_decay=0.01))


def test_cls_train_step_adds_kd_and_teacher_does_not_move(cls_scope):
    distiller = CPDDistiller(student=cls_cfg(), teacher='self', distill='kl')
    distiller.init_weights()
    assert distiller.data_preprocessor is distiller.student.data_preprocessor
    teacher_before = state(distiller.teacher)
    student_before = state(distiller.student)
    assert all(torch.equal(teacher_before[k], v)
               for k, v in student_before.items())
    distiller.train()
    optim = sgd(distiller)
    for _ in range(2):
        log_vars = distiller.train_step(cls_data(), optim)
    assert {'loss', 'loss_kd_kl'} <= set(log_vars)
    assert not distiller.teacher.training and distiller.student.training
    for key, value in state(distiller.teacher).items():  # incl. BN stats
        assert torch.equal(value, teacher_before[key]), key
    moved = [k for k, v in state(distiller.student).items()
             if not torch.equal(v, student_before[k])]
    assert 'head.fc.weight' in moved


def test_kd_gradient_reaches_the_student_only(cls_scope):
    distiller = CPDDistiller(student=cls_cfg(), distill='kl')
    with torch.no_grad():  # make the student differ from its teacher
        distiller.student.head.fc.weight.add_(1.0)
    data = distiller.data_preprocessor(cls_data(), True)
    losses = distiller.loss(**data)
    assert losses['loss_kd_kl'].item() > 0
    losses['loss_kd_kl'].backward()
    assert all(p.grad is None for p in distiller.teacher.parameters())
    assert distiller.student.head.fc.weight.grad.abs().sum() > 0
    assert distiller.student.backbone.conv1.weight.grad.abs().sum() > 0


def test_val_and_test_step_are_the_students(cls_scope):
    distiller = CPDDistiller(student=cls_cfg(), distill='kl')
    distiller.eval()
    with torch.no_grad():
        distiller.student.head.fc.weight.mul_(3.0)  # teacher != student
        ours = distiller.val_step(cls_data())
        theirs = distiller.student.val_step(cls_data())
        tested = distiller.test_step(cls_data())
    for a, b, c in zip(ours, theirs, tested):
        assert torch.equal(a.pred_score, b.pred_score)
        assert torch.equal(a.pred_score, c.pred_score)


def test_checkpoint_reloads_and_loads_as_plain_student(cls_scope, tmp_path):
    distiller = CPDDistiller(student=cls_cfg(), distill='kl')
    distiller.init_weights()
    distiller.train_step(cls_data(), sgd(distiller))  # student != teacher
    path = str(tmp_path / 'distill.pth')
    torch.save(dict(state_dict=distiller.state_dict(), meta=dict(x=1)), path)

    again = CPDDistiller(student=cls_cfg(), distill='kl')
    again.load_state_dict(torch.load(path)['state_dict'], strict=True)
    for key, value in distiller.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key

    sd = torch.load(path)['state_dict']
    assert is_distill_state_dict(sd)
    plain = MODELS.build(cls_cfg())
    plain.load_state_dict(student_state_dict(path), strict=True)
    plain2 = MODELS.build(cls_cfg())
    ckpt = load_checkpoint(plain2, 'student://' + path, strict=True)
    assert ckpt['meta'] == dict(x=1)
    distiller.eval(), plain.eval(), plain2.eval()
    with torch.no_grad():
        want = distiller.val_step(cls_data())
        for model in (plain, plain2):
            got = model.val_step(cls_data())
            assert torch.equal(want[0].pred_score, got[0].pred_score)
    # plain checkpoints pass through untouched ...
    assert student_state_dict(plain.state_dict()).keys() == \
        plain.state_dict().keys()
    # ... and load into a distiller as student and 'self' teacher, with
    # torch's loader and with mmengine's (what `load_from` uses)
    plain_path = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict=plain.state_dict()), plain_path)
    fresh = CPDDistiller(student=cls_cfg(), distill='kl')
    fresh.load_state_dict(plain.state_dict(), strict=True)
    fresh2 = CPDDistiller(student=cls_cfg(), distill='kl')
    load_checkpoint(fresh2, plain_path, strict=True)
    for model in (fresh, fresh2):
        for key, value in plain.state_dict().items():
            assert torch.equal(model.student.state_dict()[key], value), key
            assert torch.equal(model.teacher.state_dict()[key], value), key


def test_pretrained_student_init_also_sets_self_teacher(cls_scope, tmp_path):
    trained = MODELS.build(cls_cfg())
    path = str(tmp_path / 'trained.pth')
    torch.save(dict(state_dict=trained.state_dict()), path)
    cfg = cls_cfg()
    cfg['init_cfg'] = dict(type='Pretrained', checkpoint=path)
    distiller = CPDDistiller(student=cfg, distill='kl')
    distiller.init_weights()
    for key, value in trained.state_dict().items():
        assert torch.equal(distiller.teacher.state_dict()[key], value), key
        assert torch.equal(distiller.student.state_dict()[key], value), key


def test_teacher_from_config_and_checkpoint(cls_scope, tmp_path):
    big = MODELS.build(cls_cfg(width=16))  # a wider sibling
    ckpt = str(tmp_path / 'big.pth')
    torch.save(dict(state_dict=big.state_dict()), ckpt)
    config = tmp_path / 'big.py'
    config.write_text(f"default_scope = 'mmpretrain'\n"
                      f'model = {cls_cfg(width=16)!r}\n')
    distiller = CPDDistiller(student=cls_cfg(), distill='kl',
                             teacher=dict(config=str(config),
                                          checkpoint=ckpt))
    distiller.init_weights()  # must not re-initialise the teacher
    for key, value in big.state_dict().items():
        assert torch.equal(distiller.teacher.state_dict()[key], value), key
    log_vars = distiller.train_step(cls_data(), sgd(distiller))
    assert log_vars['loss_kd_kl'] > 0
    # load_from a plain student checkpoint: the student takes it, the
    # teacher keeps its own weights and nothing is reported missing
    small = MODELS.build(cls_cfg())
    result = distiller.load_state_dict(small.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in big.state_dict().items():
        assert torch.equal(distiller.teacher.state_dict()[key], value), key
    for key, value in small.state_dict().items():
        assert torch.equal(distiller.student.state_dict()[key], value), key
    with pytest.raises(ValueError, match='config'):
        CPDDistiller(student=cls_cfg(), teacher=dict(checkpoint=ckpt))


@pytest.mark.parametrize('teacher', ['self', 'none'])
def test_plain_checkpoint_loads_into_the_student(cls_scope, teacher):
    """load_from a plain model checkpoint: with distill='none' there is no
    teacher at all (the same-budget reference runs so), with 'self' the
    teacher is the loaded model too."""
    distill = 'none' if teacher == 'none' else 'kl'
    distiller = CPDDistiller(student=cls_cfg(), distill=distill)
    plain = MODELS.build(cls_cfg())
    result = distiller.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in plain.state_dict().items():
        assert torch.equal(distiller.student.state_dict()[key], value), key
        if teacher == 'self':
            assert torch.equal(distiller.teacher.state_dict()[key], value)


def test_presets_and_classifier_rejects_dense_losses(cls_scope):
    assert build_distill_cfg('none', 'mmseg') == []
    assert [d['type'] for d in build_distill_cfg('CIRKD', 'mmseg')] == [
        'KLDivergence', 'CIRKDLoss']
    with pytest.raises(ValueError, match='dense predictions'):
        CPDDistiller(student=cls_cfg(), distill='cwd')
    with pytest.raises(ValueError, match="'kd'"):
        build_distill_cfg('kd', 'mmseg')
    plain = CPDDistiller(student=cls_cfg(), distill='none')
    assert plain.teacher is None
    log_vars = plain.train_step(cls_data(), sgd(plain))
    assert not any(k.startswith('loss_kd') for k in log_vars)


@pytest.mark.parametrize('kind,keys', [
    ('kl', ['loss_kd_kl']),
    ('cwd', ['loss_kd_cwd']),
    ('cirkd', ['loss_kd_kl', 'loss_kd_cirkd_minibatch_p2p',
               'loss_kd_cirkd_memory_p2p', 'loss_kd_cirkd_memory_p2r']),
])
def test_seg_train_and_val_steps(seg_scope, kind, keys):
    distiller = CPDDistiller(student=seg_cfg(), teacher='self', distill=kind)
    distiller.init_weights()
    distiller.train()
    log_vars = distiller.train_step(seg_data(), sgd(distiller))
    assert set(keys) <= set(log_vars) and 'decode.loss_ce' in log_vars
    assert all(log_vars[k] >= 0 for k in keys)
    distiller.eval()
    with torch.no_grad():
        out = distiller.val_step(seg_data())
    assert out[0].pred_sem_seg.data.shape == (1, 32, 32)


def test_seg_cirkd_reads_widths_and_checkpoints_its_memories(seg_scope):
    teacher = MODELS.build(seg_cfg(channels=24))  # wider decode head
    distiller = CPDDistiller(student=seg_cfg(), teacher=teacher,
                             distill='cirkd')
    cirkd = distiller.distill_losses[1]
    assert (cirkd.num_classes, cirkd.student_channels,
            cirkd.teacher_channels, cirkd.ignore_index) == (4, 16, 24, 255)
    assert cirkd.project_head[0].weight.shape == (24, 16, 1, 1)
    head_before = cirkd.project_head[0].weight.detach().clone()
    distiller.train_step(seg_data(), sgd(distiller))
    assert int(cirkd.num_updates) == 1 and cirkd.pixel_queue_ptr.sum() > 0
    # the projection head is trained with the student
    assert not torch.equal(cirkd.project_head[0].weight, head_before)
    sd = distiller.state_dict()
    assert 'distill_losses.1.pixel_queue' in sd
    again = CPDDistiller(student=seg_cfg(),
                         teacher=MODELS.build(seg_cfg(channels=24)),
                         distill='cirkd')
    again.load_state_dict(sd, strict=True)
    assert torch.equal(again.distill_losses[1].pixel_queue, cirkd.pixel_queue)
    assert torch.equal(again.distill_losses[1].region_queue_ptr,
                       cirkd.region_queue_ptr)
    assert list(student_state_dict(sd)) == list(distiller.student.state_dict())


def test_source_errors_name_modules_and_shapes(seg_scope):
    with pytest.raises(ValueError, match="no submodule 'backbone.nope'"):
        CPDDistiller(student=seg_cfg(), distill=[
            dict(type='KLDivergence', student='backbone.nope',
                 teacher='logits')])
    # a tuple of tensors is a multi-level source: it needs a multi-level
    # partner (a list of levels, or the same module of the teacher)
    tuple_out = CPDDistiller(student=seg_cfg(), distill=[
        dict(type='ChannelWiseDivergence', student='backbone',
             teacher='logits')])
    with pytest.raises(ValueError, match=r"student 'backbone' 4 levels .*"
                       r"teacher 'logits' \(2, 4, 4, 4\): a multi-level"):
        tuple_out.train_step(seg_data(), sgd(tuple_out))
    mismatch = CPDDistiller(student=seg_cfg(), distill=[
        dict(type='ChannelWiseDivergence', student='logits',
             teacher='decode_head.bottleneck')])
    with pytest.raises(ValueError, match=r"distill 'cwd': student 'logits' "
                       r"\(2, 4, 4, 4\), teacher 'decode_head.bottleneck' "
                       r'\(2, 16, 4, 4\)'):
        mismatch.train_step(seg_data(), sgd(mismatch))
