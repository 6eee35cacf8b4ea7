"""cpd_mm.apis.init_model and the building blocks of cpd_mm.deploy."""
import importlib.util
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config

from cpd_mm.apis import CheckpointError, extract_state_dict, init_model
from cpd_mm.deploy import (atomic_output, comparison, default_input_shape,
                           latency_stats)
from cpd_mm.deploy.report import comparison_table, format_table
from cpd_mm.deploy.rewrites import StaticAdaptiveAvgPool2d, exportable_modules

CLS_CFG = dict(
    default_scope='mmpretrain',
    model=dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet', depth=18, stem_channels=4,
                      base_channels=4, out_indices=(3, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=3, in_channels=32,
                  loss=dict(type='CrossEntropyLoss'))))


@pytest.fixture
def cls_cfg():
    return Config(CLS_CFG)


def save(path, state_dict, meta=None):
    torch.save({'state_dict': state_dict, 'meta': meta or {}}, str(path))
    return str(path)


def test_init_model_eval_device_and_weights(cls_cfg, tmp_path):
    torch.manual_seed(0)
    ref = init_model(cls_cfg, device='cpu')
    ckpt = save(tmp_path / 'a.pth', ref.state_dict())
    model = init_model(cls_cfg, ckpt)  # device=None picks cuda if present
    assert not model.training and model.cpd_plan is None
    expected = 'cuda' if torch.cuda.is_available() else 'cpu'
    assert next(model.parameters()).device.type == expected
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k].cpu(), v)
    assert cls_cfg.model.backbone.depth == 18  # caller's config untouched


def test_distiller_checkpoint_keeps_the_student(cls_cfg, tmp_path):
    student = init_model(cls_cfg, device='cpu')
    teacher = init_model(cls_cfg, device='cpu')
    wrapped = {f'student.{k}': v for k, v in student.state_dict().items()}
    wrapped.update(
        {f'teacher.{k}': v + 1 for k, v in teacher.state_dict().items()})
    wrapped['distill_losses.0.proj.weight'] = torch.zeros(2, 2)
    ckpt = save(tmp_path / 'kd.pth', wrapped)
    model = init_model(cls_cfg, ckpt, device='cpu')
    for k, v in student.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    assert set(extract_state_dict({'state_dict': wrapped})) == set(
        student.state_dict())


def test_mismatched_checkpoint_is_explained(cls_cfg, tmp_path):
    sd = init_model(cls_cfg, device='cpu').state_dict()
    sd['head.fc.weight'] = torch.zeros(3, 16)
    del sd['head.fc.bias']
    sd['extra.weight'] = torch.zeros(1)
    ckpt = save(tmp_path / 'bad.pth', sd)
    with pytest.raises(CheckpointError) as info:
        init_model(cls_cfg, ckpt, device='cpu')
    msg = str(info.value)
    assert ckpt in msg
    assert 'head.fc.weight: checkpoint (3, 16) vs model (3, 32)' in msg
    assert 'missing keys: head.fc.bias' in msg
    assert 'unexpected keys: extra.weight' in msg


def make_pruned_checkpoint(cfg, path, tamper=None):
    """Prune every other channel of each group (real comb + surgery)."""
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import apply_plan, make_plan
    model = init_model(cfg, device='cpu')
    comb = comb_model(model, input_shape=(1, 3, 32, 32))
    kept = np.ones(comb.num_channels, dtype=bool)
    for group in comb.prunable_groups:
        kept[group.channels[~group.frozen][::2]] = False
    plan = make_plan(comb, kept, model)
    apply_plan(model, plan, comb)
    if tamper:
        tamper(plan)
    return save(path, model.state_dict(), {'cpd_plan': plan}), model, plan


def test_plan_is_applied_before_the_weights_are_loaded(cls_cfg, tmp_path):
    """meta['cpd_plan'] shrinks the model first, then loads strictly."""
    ckpt, pruned, plan = make_pruned_checkpoint(cls_cfg, tmp_path / 'p.pth')
    model = init_model(cls_cfg, ckpt, device='cpu')
    assert model.cpd_plan == plan
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in pruned.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x, mode='tensor'),
                              pruned(x, mode='tensor'), atol=1e-6)


def test_plan_that_does_not_fit_is_a_checkpoint_error(cls_cfg, tmp_path):
    def tamper(plan):
        name = next(iter(plan['groups']))
        plan['groups'][name]['num_channels'] += 1

    ckpt, _, _ = make_pruned_checkpoint(cls_cfg, tmp_path / 'bad.pth', tamper)
    with pytest.raises(CheckpointError, match='does not fit') as info:
        init_model(cls_cfg, ckpt, device='cpu')
    assert ckpt in str(info.value)


def test_default_input_shape_sources():
    cls = Config(dict(test_dataloader=dict(dataset=dict(pipeline=[
        dict(type='ResizeEdge', scale=256),
        dict(type='mmpretrain.CenterCrop', crop_size=(200, 100))]))))
    assert default_input_shape(cls, 'classification') == (
        (100, 200), 'test pipeline CenterCrop.crop_size')  # (w, h) -> (h, w)
    fixed = Config(dict(test_pipeline=[
        dict(type='Resize', scale=(64, 48), keep_ratio=False)]))
    assert default_input_shape(fixed, 'classification')[0] == (48, 64)
    keep = Config(dict(test_pipeline=[
        dict(type='Resize', scale=(64, 48), keep_ratio=True)]))
    assert default_input_shape(keep, 'classification') == (None, '')
    slide = Config(dict(crop_size=(1, 1), model=dict(
        test_cfg=dict(mode='slide', crop_size=(512, 1024), stride=(8, 8)),
        data_preprocessor=dict(size=(2, 2)))))
    assert default_input_shape(slide, 'segmentation') == (
        (512, 1024), 'model.test_cfg.crop_size')
    plain = Config(dict(crop_size=(480, 640), model=dict(test_cfg=dict())))
    assert default_input_shape(plain, 'segmentation')[0] == (480, 640)
    # detectors: keep_ratio resizes give the largest size, a Pad fixes it
    det = Config(dict(test_dataloader=dict(dataset=dict(pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=(1333, 800), keep_ratio=True)]))))
    assert default_input_shape(det, 'detection') == (
        (800, 1333), 'test pipeline Resize.scale (keep_ratio: the largest '
        'size)')
    det.test_dataloader.dataset.pipeline.append(
        dict(type='Pad', size=(640, 640)))
    assert default_input_shape(det, 'detection') == (
        (640, 640), 'test pipeline Pad.size')


def test_atomic_output_publishes_only_complete_files(tmp_path):
    target = tmp_path / 'out.bin'
    with atomic_output(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        with open(tmp, 'wb') as f:
            f.write(b'new')
        assert not target.exists()  # nothing visible before the rename
    assert target.read_bytes() == b'new'
    umask = os.umask(0)
    os.umask(umask)
    # mode of a plain open(), not mkstemp's private 0600
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask

    with pytest.raises(FileExistsError, match='--force'):
        with atomic_output(str(target)):
            pytest.fail('must refuse before yielding')
    with pytest.raises(RuntimeError):
        with atomic_output(str(target), force=True) as tmp:
            with open(tmp, 'wb') as f:
                f.write(b'half')
            raise RuntimeError('writer crashed')
    assert target.read_bytes() == b'new'
    assert [p.name for p in tmp_path.iterdir()] == ['out.bin']

    # a file that appears while writing is not clobbered without force
    other = tmp_path / 'race.bin'
    with pytest.raises(FileExistsError):
        with atomic_output(str(other)) as tmp:
            other.write_bytes(b'theirs')
    assert other.read_bytes() == b'theirs'
    with atomic_output(str(other), force=True) as tmp:
        with open(tmp, 'wb') as f:
            f.write(b'ours')
    assert other.read_bytes() == b'ours'


def test_latency_stats_and_comparison():
    times = np.arange(1, 101) / 1e3  # 1 .. 100 ms
    s = latency_stats(times, batch=4)
    assert s['runs'] == 100 and s['min_ms'] == pytest.approx(1)
    assert s['median_ms'] == pytest.approx(50.5)
    assert s['p90_ms'] == pytest.approx(90.1)
    assert s['p99_ms'] == pytest.approx(99.01)
    assert s['throughput'] == pytest.approx(4e3 / 50.5)
    with pytest.raises(ValueError):
        latency_stats([], batch=1)

    fast = dict(s, mean_ms=25.25, median_ms=25.0, provider='CPU', batch=4,
                runs=100, throughput=2 * s['throughput'])
    original = dict(params=1000, flops=4000, benchmark=s)
    pruned = dict(params=250, flops=1000, benchmark=fast)
    c = comparison(original, pruned)
    assert c['params_ratio'] == 4 and c['flops_ratio'] == 4
    assert c['speedup_mean'] == pytest.approx(2)
    assert c['speedup_median'] == pytest.approx(2.02)
    assert c['params_removed'] == pytest.approx(0.75)
    table = comparison_table(original, pruned)
    assert 'FLOPs' in table and '4.00x' in table and '2.02x' in table


def test_format_table_aligns_columns():
    text = format_table(('a', 'bb'), [('long name', '1'), ('x', '22222')])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].startswith('long name') and lines[3].endswith('22222')


@pytest.mark.parametrize('size, out', [((8, 8), 3), ((8, 8), 6), ((7, 10), 4),
                                       ((9, 5), (2, None)), ((8, 8), 4)])
def test_static_adaptive_pooling_is_exact(size, out):
    pool = torch.nn.AdaptiveAvgPool2d(out)
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(StaticAdaptiveAvgPool2d(pool)(x), pool(x))


def test_exportable_modules_restores_the_model():
    pool = torch.nn.AdaptiveAvgPool2d(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1),
                                torch.nn.Sequential(pool))
    with pytest.raises(RuntimeError):
        with exportable_modules(model) as n:
            assert n == 1
            assert isinstance(model[1][0], StaticAdaptiveAvgPool2d)
            raise RuntimeError('export failed')
    assert model[1][0] is pool


@pytest.mark.parametrize('argv, message', [
    (['--runs', '0'], '--runs must be >= 1'),
    (['--shape', '1', '2', '3'], '--shape takes H W'),
    (['--compare-config', 'x.py'], '--compare-config needs --compare-to'),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    tool = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools',
                    'export_onnx.py')
    spec = importlib.util.spec_from_file_location('export_onnx_tool', tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as info:
        module.parse_args(['cfg.py', 'ckpt.pth'] + argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
