"""Torch-Pruning's result as a cpd_mm plan (benchmarks/tp_bridge.py): the
plan rebuilds TP's model exactly, and the saved checkpoint loads through
the project's own path (``init_model`` applies the plan)."""
import os.path as osp
import sys

import pytest
import torch

pytest.importorskip('torch_pruning')

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
from tp_bridge import (check_plan, group_widths,  # noqa: E402
                       plan_from_history, tp_prune)

from cpd_mm.apis import init_model  # noqa: E402
from cpd_mm.comb import comb_model  # noqa: E402

CLS = osp.join(ROOT, 'configs/demo/resnet18_demo-cls.py')
SEG = osp.join(ROOT, 'configs/demo/pspnet_r18_demo-seg.py')


def _bridge(model, shape, importance='magnitude', ratio=0.5, grads=None):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    pruned, history, _ = tp_prune(model, x, importance, ratio, grads=grads)
    comb = comb_model(model, input_shape=shape, verify=False)
    plan = plan_from_history(comb, history, model)
    return x, pruned, comb, plan


@pytest.mark.parametrize('config,shape', [(CLS, (1, 3, 32, 32)),
                                          (SEG, (1, 3, 64, 64))])
def test_plan_rebuilds_tp_model(tmp_path, config, shape):
    torch.manual_seed(0)
    model = init_model(config, device='cpu')
    x, pruned, comb, plan = _bridge(model, shape)
    widths = group_widths(comb, plan)
    assert any(k < s for _, k, s in widths), 'TP pruned nothing'
    assert all(k % 8 == 0 for _, k, _ in widths)  # round_to=8
    fresh = init_model(config, device='cpu')
    assert check_plan(fresh, plan, pruned, x) == 0.0
    assert {n: p.shape for n, p in fresh.named_parameters()} == \
        {n: p.shape for n, p in pruned.named_parameters()}
    # the checkpoint as the benchmark saves it loads with its plan
    from mmengine.runner.checkpoint import save_checkpoint
    path = str(tmp_path / 'tp.pth')
    save_checkpoint({'state_dict': pruned.state_dict(),
                     'meta': {'cpd_plan': plan}}, path)
    loaded = init_model(config, path, device='cpu')
    with torch.no_grad():
        a, b = loaded(x, mode='tensor'), pruned.eval()(x, mode='tensor')
    assert torch.equal(a, b)


def test_taylor_needs_gradients():
    model = init_model(CLS, device='cpu')
    with pytest.raises(ValueError, match='gradients'):
        tp_prune(model, torch.randn(1, 3, 32, 32), 'taylor', 0.3)


def test_vit_attention_heads_stay_uniform():
    """MMPretrain's fused attention: TP prunes head dims alike in q, k, v
    of every head once the bridge rewrites the forward TP traces, and the
    plan rebuilds the model (head_dims / embed_dims updated)."""
    from mmpretrain.models import ImageClassifier
    torch.manual_seed(0)
    model = ImageClassifier(
        backbone=dict(type='VisionTransformer', arch='deit-tiny',
                      img_size=32, patch_size=8),
        neck=None,
        head=dict(type='VisionTransformerClsHead', num_classes=5,
                  in_channels=192)).eval()
    x, pruned, comb, plan = _bridge(model, (1, 3, 32, 32), ratio=0.3)
    attn = pruned.backbone.layers[0].attn
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dims
    fresh = ImageClassifier(
        backbone=dict(type='VisionTransformer', arch='deit-tiny',
                      img_size=32, patch_size=8),
        neck=None,
        head=dict(type='VisionTransformerClsHead', num_classes=5,
                  in_channels=192))
    assert check_plan(fresh, plan, pruned, x) < 1e-5
    assert any(k < s for _, k, s in group_widths(comb, plan))
