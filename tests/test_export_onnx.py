"""tools/export_onnx.py end to end: export, verify, benchmark, compare, JSON.

The demo classifier and segmentor (configs/demo/) with random weights, pruned
for real (comb, plan, surgery), plus tiny inline classifiers of chosen width;
all CPU-sized.
"""
import copy
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(ROOT, 'tools', 'export_onnx.py')
DEMO_CLS = osp.join(ROOT, 'configs', 'demo', 'resnet18_demo-cls.py')
DEMO_SEG = osp.join(ROOT, 'configs', 'demo', 'pspnet_r18_demo-seg.py')
DEMO_DET = osp.join(ROOT, 'configs', 'demo', 'rtmdet_demo-det.py')

# A ResNet-18-shaped classifier whose widths scale with `w`.
CLS_CONFIG = """
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    backbone=dict(type='ResNet', depth=18, stem_channels={w},
                  base_channels={w}, out_indices=(3, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(type='LinearClsHead', num_classes=5, in_channels={w8},
              loss=dict(type='CrossEntropyLoss')))
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=40, edge='short'),
    dict(type='CenterCrop', crop_size=32),
    dict(type='PackInputs')]
"""

REPORT_KEYS = {
    'schema_version', 'cpd_mm_version', 'config', 'checkpoint', 'task',
    'pruned', 'device', 'input_size', 'input_size_source', 'onnx', 'params',
    'flops', 'verify', 'precision', 'int8', 'benchmark', 'compare'
}
ONNX_KEYS = {
    'path', 'task', 'opset', 'input_name', 'output_name', 'input_shape',
    'output_shape', 'output_names', 'output_shapes', 'dynamic_batch',
    'simplified', 'size_bytes'
}
BENCH_KEYS = {
    'runs', 'mean_ms', 'median_ms', 'p90_ms', 'p99_ms', 'min_ms', 'max_ms',
    'std_ms', 'throughput', 'provider', 'providers', 'warmup', 'batch',
    'threads'
}
VERIFY_KEYS = {
    'passed', 'max_abs_diff', 'max_rel_diff', 'max_abs_ref',
    'argmax_agreement', 'atol', 'rtol', 'batch_sizes', 'provider', 'outputs'
}


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('export_onnx_tool', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(tmp_dir, width, name):
    """A classifier config (:data:`CLS_CONFIG`) of width ``width``."""
    config = osp.join(tmp_dir, f'{name}.py')
    with open(config, 'w') as f:
        f.write(CLS_CONFIG.format(w=width, w8=8 * width))
    return config


def make_model(tmp_dir, config, name, prune_shape=None):
    """Random-weight checkpoint(s) of ``config``.

    With ``prune_shape``, also a real pruned checkpoint: comb the model at
    that input shape, drop every other prunable channel of every group,
    apply the plan (surgery) and save the smaller weights with the plan in
    ``meta['cpd_plan']``.

    Returns:
        dict: ``config``, ``checkpoint``, ``model`` and, when pruned,
        ``pruned_checkpoint``, ``pruned_model``.
    """
    from cpd_mm.apis import init_model
    torch.manual_seed(0)
    model = init_model(config, device='cpu')
    # Non-trivial BN statistics, so a wrong folding would show in verify.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    out = dict(config=config, checkpoint=osp.join(tmp_dir, f'{name}.pth'),
               model=model)
    torch.save({'state_dict': model.state_dict(), 'meta': {}},
               out['checkpoint'])
    if prune_shape:
        from cpd_mm.comb import comb_model
        from cpd_mm.prune import apply_plan, make_plan
        pruned = copy.deepcopy(model)
        comb = comb_model(pruned, input_shape=prune_shape)
        kept = np.ones(comb.num_channels, dtype=bool)
        for group in comb.prunable_groups:
            kept[group.channels[~group.frozen][::2]] = False
        plan = make_plan(comb, kept, pruned)
        apply_plan(pruned, plan, comb)
        out.update(pruned_model=pruned,
                   pruned_checkpoint=osp.join(tmp_dir, f'{name}_pruned.pth'))
        torch.save({'state_dict': pruned.state_dict(),
                    'meta': {'cpd_plan': plan}}, out['pruned_checkpoint'])
    return out


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope='module')
def cls_small(tmp_path_factory):
    """The demo classifier (CIFAR-style ResNet-18, 32x32), pruned."""
    return make_model(str(tmp_path_factory.mktemp('cls')), DEMO_CLS, 'cls',
                      prune_shape=(1, 3, 32, 32))


@pytest.fixture(scope='module')
def seg_small(tmp_path_factory):
    """The demo segmentor (PSPNet, ResNet-18 D8, 64x64), pruned."""
    return make_model(str(tmp_path_factory.mktemp('seg')), DEMO_SEG, 'seg',
                      prune_shape=(1, 3, 64, 64))


@pytest.fixture(scope='module')
def det_small(tmp_path_factory):
    """The demo detector (narrow RTMDet, 96x96), pruned."""
    return make_model(str(tmp_path_factory.mktemp('det')), DEMO_DET, 'det',
                      prune_shape=(1, 3, 96, 96))


def check_report_schema(report):
    assert set(report) == REPORT_KEYS
    assert set(report['onnx']) == ONNX_KEYS
    assert isinstance(report['params'], int) and report['params'] > 0
    assert isinstance(report['flops'], int) and report['flops'] > 0
    if report['verify'] is not None:
        assert set(report['verify']) == VERIFY_KEYS
    if report['benchmark'] is not None:
        b = report['benchmark']
        assert set(b) == BENCH_KEYS
        assert b['min_ms'] <= b['median_ms'] <= b['p90_ms'] <= b['p99_ms'] \
            <= b['max_ms']
        assert b['min_ms'] <= b['mean_ms'] <= b['max_ms']
        assert b['throughput'] == pytest.approx(
            b['batch'] * 1e3 / b['mean_ms'])


def run_ort(path, x):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {'input': x.numpy()})[0]


def test_pruned_classifier_export_verify_benchmark(tool, cls_small,
                                                   tmp_path, capsys):
    m = cls_small
    out, js = str(tmp_path / 'cls.onnx'), str(tmp_path / 'cls.json')
    code = tool.main([m['config'], m['pruned_checkpoint'], '--out', out,
                      '--verify', '--benchmark', '--runs', '7', '--warmup',
                      '2', '--threads', '1', '--json', js])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'pruning plan applied' in printed
    assert 'CPUExecutionProvider' in printed  # the provider is always shown
    # the demo's test pipeline keeps the stored 32x32 size
    assert 'from train pipeline RandomCrop.crop_size' in printed
    with open(js) as f:
        report = json.load(f)
    check_report_schema(report)
    assert report['task'] == 'classification' and report['pruned']
    assert report['onnx']['input_shape'] == [1, 3, 32, 32]
    num_classes = m['model'].head.num_classes
    assert report['onnx']['output_shape'] == [1, num_classes]
    assert report['verify']['passed']
    assert report['verify']['max_abs_diff'] <= 1e-3
    assert report['benchmark']['runs'] == 7
    assert report['benchmark']['threads'] == 1
    assert report['benchmark']['provider'] == 'CPUExecutionProvider'
    # the graph is the physically smaller one
    assert report['params'] == num_params(m['pruned_model'])
    assert report['params'] < 0.4 * num_params(m['model'])

    # The file holds the pruned checkpoint's weights: same logits.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = m['pruned_model'](x, mode='tensor').numpy()
    np.testing.assert_allclose(run_ort(out, x), expected, rtol=1e-3,
                               atol=1e-4)


def test_pruned_segmentor_export_dynamic_batch(tool, seg_small, tmp_path,
                                               capsys):
    m = seg_small
    out, js = str(tmp_path / 'seg.onnx'), str(tmp_path / 'seg.json')
    code = tool.main([m['config'], m['pruned_checkpoint'], '--out', out,
                      '--dynamic-batch', '--verify', '--benchmark', '--runs',
                      '5', '--warmup', '1', '--json', js])
    assert code == 0, capsys.readouterr().err
    with open(js) as f:
        report = json.load(f)
    check_report_schema(report)
    assert report['task'] == 'segmentation' and report['pruned']
    assert report['input_size_source'] == 'model.data_preprocessor.size'
    # logits are resized to the full input size, (H, W) = crop_size; the
    # pyramid pooling (bins 3 and 6 of an 8x8 map) needs the exact rewrite
    num_classes = m['model'].decode_head.num_classes
    assert report['onnx']['output_shape'] == [1, num_classes, 64, 64]
    assert report['verify']['batch_sizes'] == [1, 2]
    # the auxiliary head is not part of the deployed graph
    pruned = m['pruned_model']
    aux = num_params(pruned.auxiliary_head)
    assert report['params'] == num_params(pruned) - aux

    graph = onnx.load(out).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == 'batch'
    x = torch.randn(3, 3, 64, 64)
    logits = run_ort(out, x)
    assert logits.shape == (3, num_classes, 64, 64)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(
            pruned(x, mode='tensor'), size=(64, 64), mode='bilinear')
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-3,
                               atol=1e-4)


def test_pruned_detector_exports_raw_head_maps(tool, det_small, tmp_path,
                                              capsys):
    m = det_small
    out, js = str(tmp_path / 'det.onnx'), str(tmp_path / 'det.json')
    code = tool.main([m['config'], m['pruned_checkpoint'], '--out', out,
                      '--verify', '--compare-to', m['checkpoint'], '--runs',
                      '5', '--warmup', '1', '--threads', '1', '--json', js])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert 'from test pipeline Resize.scale' in printed
    with open(js) as f:
        report = json.load(f)
    check_report_schema(report)
    assert report['task'] == 'detection' and report['pruned']
    names = [f'{kind}_{level}' for kind in ('cls_score', 'bbox_pred')
             for level in range(3)]
    assert report['onnx']['output_names'] == names
    # 4 classes and 4 distances per point, strides 8, 16, 32 of 96x96
    assert report['onnx']['output_shapes'] == [
        [1, c, s, s] for c in (4, 4) for s in (12, 6, 3)]
    assert report['verify']['passed'] and report['verify']['outputs'] == 6
    assert report['params'] == num_params(m['pruned_model'])
    assert report['compare']['params_ratio'] > 2

    # no NMS or decoding in the graph: its outputs are the head's raw maps
    graph = onnx.load(out).graph
    assert not {'NonMaxSuppression', 'TopK'} & {n.op_type
                                                 for n in graph.node}
    x = torch.randn(1, 3, 96, 96)
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    maps = session.run(None, {'input': x.numpy()})
    with torch.no_grad():
        cls_scores, bbox_preds = m['pruned_model'](x, mode='tensor')
    for got, expected in zip(maps, [*cls_scores, *bbox_preds]):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3,
                                   atol=1e-3)


def test_compare_pruned_to_unpruned(tool, cls_small, tmp_path, capsys):
    m = cls_small
    js = str(tmp_path / 'cmp.json')
    code = tool.main([m['config'], m['pruned_checkpoint'], '--out',
                      str(tmp_path / 'p.onnx'), '--compare-to',
                      m['checkpoint'], '--runs', '5', '--warmup', '1',
                      '--verify', '--json', js])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'original/pruned' in printed and 'speed-up' in printed
    assert 'interleaved' in printed
    with open(js) as f:
        report = json.load(f)
    check_report_schema(report)
    cmp = report['compare']
    assert cmp['original']['checkpoint'] == osp.abspath(m['checkpoint'])
    assert cmp['original']['verify']['passed']
    assert cmp['original']['params'] == num_params(m['model'])
    assert cmp['pruned']['params'] == num_params(m['pruned_model'])
    # half of every prunable group: about 1/4 of the conv weights remain
    assert 3 < cmp['params_ratio'] < 4.2
    assert 2.5 < cmp['flops_ratio'] < 4.2
    assert cmp['speedup_median'] > 0
    assert cmp['pruned']['benchmark'] == report['benchmark']
    assert cmp['original']['benchmark']['runs'] == 5
    assert cmp['flops_removed'] == pytest.approx(1 - 1 / cmp['flops_ratio'])


def test_compare_to_another_config(tool, tmp_path, capsys):
    """--compare-config: a hand-made half-width model against the original."""
    tmp = str(tmp_path)
    full = make_model(tmp, write_config(tmp, 8, 'full'), 'full')
    half = make_model(tmp, write_config(tmp, 4, 'half'), 'half')
    code = tool.main([half['config'], half['checkpoint'], '--out',
                      str(tmp_path / 'h.onnx'), '--compare-to',
                      full['checkpoint'], '--compare-config', full['config'],
                      '--runs', '3', '--warmup', '0', '--json',
                      str(tmp_path / 'h.json')])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / 'h.json').read_text())
    assert not report['pruned']
    assert report['input_size_source'] == 'test pipeline CenterCrop.crop_size'
    assert report['compare']['original']['config'] == full['config']
    assert report['compare']['params_ratio'] == pytest.approx(
        num_params(full['model']) / num_params(half['model']))


def test_refuses_to_overwrite_without_force(tool, cls_small, tmp_path,
                                            capsys):
    config, checkpoint = cls_small['config'], cls_small['checkpoint']
    out, js = tmp_path / 'm.onnx', tmp_path / 'm.json'
    out.write_bytes(b'keep me')
    assert tool.main([config, checkpoint, '--out', str(out)]) == 1
    assert '--force' in capsys.readouterr().err
    assert out.read_bytes() == b'keep me'

    # an existing JSON is refused before any export work is done
    os.remove(out)
    js.write_text('{}')
    assert tool.main([config, checkpoint, '--out', str(out), '--json',
                      str(js)]) == 1
    assert not out.exists() and js.read_text() == '{}'

    out.write_bytes(b'keep me')
    assert tool.main([config, checkpoint, '--out', str(out), '--json',
                      str(js), '--force']) == 0
    onnx.checker.check_model(str(out))
    assert json.loads(js.read_text())['onnx']['path'] == str(out)
    # nothing but the two outputs: the temporary files were renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.json', 'm.onnx']


def test_failed_verification_writes_nothing(tool, cls_small, tmp_path,
                                            capsys, monkeypatch):
    """An export that does not match PyTorch must not reach --out."""
    import cpd_mm.deploy.verify as verify_mod

    class Shifted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) + 0.01

    real = verify_mod.export_module
    monkeypatch.setattr(verify_mod, 'export_module',
                        lambda m: Shifted(real(m)))
    config, checkpoint = cls_small['config'], cls_small['checkpoint']
    out = tmp_path / 'bad.onnx'
    assert tool.main([config, checkpoint, '--out', str(out), '--verify']) == 1
    err = capsys.readouterr().err
    assert 'verification FAILED' in err and 'max |onnxruntime - torch|' in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_named(tool, cls_small, tmp_path, capsys):
    config = cls_small['config']
    missing = str(tmp_path / 'nope.pth')
    assert tool.main([config, missing, '--out', str(tmp_path / 'a.onnx')]) \
        == 1
    err = capsys.readouterr().err
    assert missing in err and 'not found' in err

    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'\x80\x02 this is not a checkpoint')
    assert tool.main([config, str(corrupt), '--out',
                      str(tmp_path / 'b.onnx')]) == 1
    assert str(corrupt) in capsys.readouterr().err
    assert not (tmp_path / 'a.onnx').exists()


def test_shape_required_when_config_has_none(tool, tmp_path, capsys):
    tmp = str(tmp_path)
    m = make_model(tmp, write_config(tmp, 2, 'tiny'), 'tiny')
    args = [m['config'], m['checkpoint'], '--out', str(tmp_path / 'x.onnx'),
            '--cfg-options', 'test_pipeline=[]']
    assert tool.main(args) == 1
    assert '--shape' in capsys.readouterr().err
    assert tool.main(args + ['--shape', '24', '40']) == 0
    assert onnx.load(str(tmp_path / 'x.onnx')).graph.input[0].type \
        .tensor_type.shape.dim[3].dim_value == 40


def test_command_line_exit_status(cls_small, tmp_path):
    """The script itself: real process, exit status and stderr."""
    config = cls_small['config']
    missing = str(tmp_path / 'missing.pth')
    proc = subprocess.run(
        [sys.executable, TOOL, config, missing], capture_output=True,
        text=True, timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 1
    assert f'checkpoint file not found: {missing}' in proc.stderr


def test_simplify_needs_onnxsim(tool, cls_small, tmp_path, capsys):
    """--simplify simplifies with onnxsim, or says how to get it (no work)."""
    out = tmp_path / 's.onnx'
    args = [cls_small['config'], cls_small['checkpoint'], '--out', str(out),
            '--simplify', '--verify']
    try:
        import onnxsim  # noqa: F401
    except ImportError:
        assert tool.main(args) == 1
        assert 'pip install onnxsim' in capsys.readouterr().err
        assert not out.exists()
    else:
        assert tool.main(args) == 0
        assert 'verified' in capsys.readouterr().out
        onnx.checker.check_model(str(out))


def test_unknown_provider_is_refused_before_export(tool, cls_small, tmp_path,
                                                   capsys):
    out = tmp_path / 'p.onnx'
    assert tool.main([cls_small['config'], cls_small['checkpoint'], '--out',
                      str(out), '--benchmark', '--providers',
                      'NoSuchExecutionProvider']) == 1
    err = capsys.readouterr().err
    assert 'NoSuchExecutionProvider' in err and 'available' in err
    assert not out.exists()
