"""Every config under configs/ builds its model and runs a forward pass.

Configs are found by glob, so new ones are covered automatically. A config
may be left out only through SKIP below, with the reason.
"""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import cpd_mm  # noqa: F401  (registers its types)
from cpd_mm.datasets.demo_data import cls_class_names, seg_class_names
from cpd_mm.datasets.demo_det import det_class_names

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# config path relative to the repo -> why its model cannot be built in CI.
SKIP = {
    # (none so far)
}


def _configs():
    paths = sorted(glob.glob(osp.join(REPO, 'configs', '**', '*.py'),
                             recursive=True))
    # _base_ folders hold fragments that are not complete configs.
    return [osp.relpath(p, REPO) for p in paths
            if '_base_' not in p.split(osp.sep)]


CONFIGS = _configs()


def test_configs_are_found():
    assert 'configs/demo/resnet18_demo-cls.py' in CONFIGS
    assert 'configs/demo/pspnet_r18_demo-seg.py' in CONFIGS
    assert set(SKIP) <= set(CONFIGS), 'SKIP names a config that is gone'


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_model(path):
    if path in SKIP:
        pytest.skip(SKIP[path])
    cfg = Config.fromfile(osp.join(REPO, path))
    assert cfg.get('custom_imports', {}).get('imports') == ['cpd_mm'], \
        'configs must import cpd_mm (custom_imports)'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model).eval()
        # A forward pass catches channel mismatches that building cannot.
        size = 32 if cfg.default_scope == 'mmpretrain' else 64
        with torch.no_grad():
            out = model(torch.rand(1, 3, size, size) * 255, mode='tensor')
    assert all(torch.isfinite(o).all() for o in _tensors(out))


def _tensors(out):
    """The tensors of a model output (detectors: tuples of per-level
    lists)."""
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return [out]


def test_demo_configs_match_generated_data():
    cls = Config.fromfile(osp.join(REPO, 'configs/demo/resnet18_demo-cls.py'))
    assert cls.model.head.num_classes == len(cls_class_names(6))
    assert cls.train_dataloader.dataset.data_root == 'data/demo/cls'
    seg = Config.fromfile(
        osp.join(REPO, 'configs/demo/pspnet_r18_demo-seg.py'))
    names = list(seg.train_dataloader.dataset.metainfo.classes)
    assert names == seg_class_names(5)
    assert seg.model.decode_head.num_classes == len(names)
    assert seg.train_dataloader.dataset.reduce_zero_label
    det = Config.fromfile(osp.join(REPO, 'configs/demo/rtmdet_demo-det.py'))
    names = list(det.train_dataloader.dataset.metainfo.classes)
    assert names == det_class_names(4)
    assert det.model.bbox_head.num_classes == len(names)
    assert det.train_dataloader.dataset.data_root == 'data/demo/det/'


@pytest.mark.parametrize('path,upstream', [
    ('configs/cpd/retinanet_r50_fpn_coco_prune.py',
     'retinanet/retinanet_r50_fpn_1x_coco.py'),
    ('configs/cpd/rtmdet_tiny_coco_prune.py',
     'rtmdet/rtmdet_tiny_8xb32-300e_coco.py'),
])
def test_detector_prune_configs_start_from_the_model_zoo(path, upstream):
    """load_from is the checkpoint that MMDetection's metafile lists for the
    inherited config, and the student is that config's model."""
    mmdet = pytest.importorskip('mmdet')
    import yaml
    configs = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs')
    with open(osp.join(configs, osp.dirname(upstream), 'metafile.yml')) as f:
        models = yaml.safe_load(f)['Models']
    weights = [m['Weights'] for m in models
               if m['Config'] == f'configs/{upstream}']
    assert len(weights) == 1
    cfg = Config.fromfile(osp.join(REPO, path))
    assert cfg.load_from == weights[0]
    assert cfg.model.type == 'CPDDistiller'
    base = Config.fromfile(osp.join(configs, upstream))
    student = cfg.model.student.to_dict()
    assert student.pop('_scope_') == 'mmdet'  # set by the mmdet:: base
    assert student == base.model.to_dict()
    hooks = [h for h in cfg.custom_hooks if h.type == 'CPDPruningHook']
    assert len(hooks) == 1 and 0 < hooks[0].target_sparsity < 1
