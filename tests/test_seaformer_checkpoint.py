"""Official SeaFormer checkpoints: direct loading through init_cfg and
tools/convert_seaformer.py, on files written here in the official layouts."""
import argparse
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.runner import load_checkpoint

import cpd_mm  # noqa: F401
from cpd_mm.models import SeaFormer

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOL = osp.join(REPO, 'tools', 'convert_seaformer.py')


def _load_tool():
    spec = importlib.util.spec_from_file_location('convert_seaformer', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _perturb(model, seed):
    """Random weights and BN statistics, so that outputs tell files apart."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen) * 0.05
            t.copy_(t.abs() + 0.5 if 'running_var' in name else t + noise)
    return model


def _segmentor(arch='tiny', seed=None):
    model = tool.build_segmentor(tool.ARCH_CONFIGS[arch], 150)
    model.init_weights()
    if seed is not None:
        _perturb(model, seed)
    return model.eval()


def _backbone_state(arch, seed):
    backbone = _perturb(SeaFormer(arch), seed)
    return {k: v.clone() for k, v in backbone.state_dict().items()}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Official-layout files: an ADE20K segmentor, ImageNet backbones."""
    root = tmp_path_factory.mktemp('official')
    segmentor = _segmentor(seed=1)
    ade = str(root / 'seaformer_tiny_ade20k.pth')
    torch.save(dict(meta=dict(CLASSES=('wall', 'building'), iter=160000),
                    state_dict=segmentor.state_dict(),
                    optimizer=dict(state={}, param_groups=[])), ade)

    plain, ema = _backbone_state('tiny', 2), _backbone_state('tiny', 3)
    linear = torch.nn.Linear(160, 1000)
    classifier = {'linear.weight': linear.weight.detach(),
                  'linear.bias': linear.bias.detach()}
    # timm checkpoints carry the training arguments; leave out the BN
    # counters, which some official files lack.
    no_counters = {k: v for k, v in plain.items()
                   if not k.endswith('num_batches_tracked')}
    imagenet = str(root / 'SeaFormer_T.pth.tar')
    torch.save(dict(epoch=599, arch='SeaFormer_T',
                    args=argparse.Namespace(model='SeaFormer_T', lr=0.064),
                    state_dict=dict(no_counters, **classifier),
                    state_dict_ema=dict(ema, **classifier)), imagenet)
    small = str(root / 'SeaFormer_S.pth')
    torch.save(dict(state_dict=_backbone_state('small', 4)), small)
    return dict(root=root, segmentor=segmentor, ade=ade, imagenet=imagenet,
                plain=plain, ema=ema, small=small)


def _backbone_from(state):
    model = SeaFormer('tiny').eval()
    model.load_state_dict(state, strict=True)
    return model


def _assert_same_outputs(a, b, x):
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x)):
            torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-6)


def test_convert_ade20k_round_trip(files, tmp_path):
    dst = str(tmp_path / 'converted.pth')
    meta = tool.convert(files['ade'], dst)
    assert (meta['arch'], meta['kind'], meta['num_classes']) == (
        'tiny', 'segmentation', 150)
    model = _segmentor(seed=9)  # other weights, replaced by the file's
    load_checkpoint(model, dst, map_location='cpu', strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, mode='tensor'), files['segmentor'](x, mode='tensor'),
            rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('ema', [False, True])
def test_convert_imagenet_picks_requested_weights(files, tmp_path, ema):
    dst = str(tmp_path / 'backbone.pth')
    meta = tool.convert(files['imagenet'], dst, ema=ema)
    assert (meta['arch'], meta['kind']) == ('tiny', 'imagenet')
    assert meta['source_key'] == ('state_dict_ema' if ema else 'state_dict')
    saved = torch.load(dst)['state_dict']
    assert not any(k.startswith('linear.') for k in saved)
    # the converted file is what the configs' backbone init_cfg loads
    backbone = SeaFormer('tiny', init_cfg=dict(type='Pretrained',
                                               checkpoint=dst)).eval()
    backbone.init_weights()
    reference = _backbone_from(files['ema' if ema else 'plain'])
    _assert_same_outputs(backbone, reference, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('use_ema', [True, False])
def test_init_cfg_loads_official_imagenet_file(files, use_ema):
    """No conversion needed: classifier dropped, EMA preferred by default
    (as the official segmentation code does)."""
    segmentor = _segmentor()
    segmentor.backbone.init_cfg = dict(
        type='Pretrained', checkpoint=files['imagenet'], use_ema=use_ema)
    segmentor.backbone.init_weights()
    reference = _backbone_from(files['ema' if use_ema else 'plain'])
    _assert_same_outputs(segmentor.backbone.eval(), reference,
                         torch.randn(1, 3, 64, 64))


def test_cli(files, tmp_path):
    dst = str(tmp_path / 'cli.pth')
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, TOOL, files['imagenet'], dst, '--ema'],
        capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert 'SeaFormer-tiny imagenet weights from "state_dict_ema"' \
        in proc.stdout
    assert torch.load(dst)['meta']['source_key'] == 'state_dict_ema'


def test_corrupt_or_foreign_files_fail_clearly(files, tmp_path):
    corrupt = str(tmp_path / 'corrupt.pth')
    with open(files['imagenet'], 'rb') as f:
        data = f.read()
    with open(corrupt, 'wb') as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(RuntimeError, match='corrupt.pth'):
        tool.convert(corrupt, str(tmp_path / 'out.pth'))
    tensor_file = str(tmp_path / 'tensor.pth')
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(RuntimeError, match='not a dict'):
        tool.convert(tensor_file, str(tmp_path / 'out.pth'))
    with pytest.raises(RuntimeError, match='no such file'):
        tool.convert(str(tmp_path / 'missing.pth'), str(tmp_path / 'o.pth'))
    with pytest.raises(KeyError, match='state_dict_ema'):
        tool.convert(files['ade'], str(tmp_path / 'out.pth'), ema=True)
    assert not os.path.exists(tmp_path / 'out.pth')


def test_mismatched_variant_fails_clearly(files, tmp_path):
    # a Small checkpoint for a Tiny backbone
    backbone = SeaFormer('tiny', init_cfg=dict(type='Pretrained',
                                               checkpoint=files['small']))
    with pytest.raises(ValueError, match='shape mismatches.*smb1'):
        backbone.init_weights()
    with pytest.raises(ValueError, match='as SeaFormer-tiny'):
        tool.convert(files['small'], str(tmp_path / 'o.pth'), arch='tiny')
    assert tool.convert(files['small'], str(tmp_path / 'o.pth'))['arch'] == \
        'small'
    # weights of no variant: the closest one and the differences are named
    partial = {k: v for k, v in files['plain'].items()
               if not k.startswith('trans2.')}
    partial_file = str(tmp_path / 'partial.pth')
    torch.save(dict(state_dict=partial), partial_file)
    with pytest.raises(ValueError, match="closest is 'tiny'.*missing keys"):
        tool.convert(partial_file, str(tmp_path / 'o.pth'))
    # keys of modules a SeaFormer segmentor does not have
    foreign = dict(files['segmentor'].state_dict())
    foreign['auxiliary_head.conv_seg.weight'] = torch.zeros(150, 32, 1, 1)
    foreign_file = str(tmp_path / 'foreign.pth')
    torch.save(dict(state_dict=foreign), foreign_file)
    with pytest.raises(KeyError, match='auxiliary_head'):
        tool.convert(foreign_file, str(tmp_path / 'o.pth'))
