"""Equivalence invariant on the MMPretrain and MMSegmentation models we claim."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.config.utils import _get_package_and_cfg_path
from mmengine.registry import MODELS, init_default_scope
from mmengine.utils import get_installed_path

import cpd_mm  # noqa: F401
from equivalence import assert_equivalent


def upstream_config(name):
    pkg, rel = _get_package_and_cfg_path(name)
    return Config.fromfile(osp.join(get_installed_path(pkg), '.mim',
                                    'configs', rel))


def build(cfg):
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    mc = cfg.model
    if 'pretrained' in mc:
        mc.pretrained = None
    if mc.get('backbone', {}).get('init_cfg'):
        mc.backbone.init_cfg = None
    model = MODELS.build(mc)
    # as users build it (zero-initialised heads and residual branches
    # included): assert_equivalent checks a copy with generic weights
    model.init_weights()
    return model


@pytest.mark.parametrize('name', [
    'mmpretrain::resnet/resnet50_8xb32_in1k.py',
    'mmpretrain::resnext/resnext50-32x4d_8xb32_in1k.py',
    'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py',
    'mmpretrain::deit/deit-small_4xb256_in1k.py',
])
def test_mmpretrain_classifiers(name):
    model = build(upstream_config(name))
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.5)
    head = [n for n, m in pruned.named_modules()
            if isinstance(m, torch.nn.Linear)][-1]
    assert pruned.get_submodule(head).out_features == 1000


def test_mmpretrain_deit_heads_uniform():
    model = build(upstream_config('mmpretrain::deit/deit-small_4xb256_in1k.py'))
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.0,
                                              leave_one=True)
    attn = pruned.backbone.layers[0].attn
    assert attn.num_heads == 6 and attn.head_dims == 1
    stream = comb.group('backbone.patch_embed.projection')
    assert {'backbone.cls_token', 'backbone.pos_embed'} <= set(
        stream.passengers)


def test_mmseg_vit_deit_upernet():
    cfg = upstream_config(
        'mmseg::vit/vit_deit-s16_upernet_8xb2-80k_ade20k-512x512.py')
    cfg.model.backbone.img_size = (64, 64)
    model = build(cfg)
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.5)
    # the auxiliary FCN head is traced too, so its inputs shrink with the
    # backbone and training (loss mode) still runs on the pruned model
    assert any('auxiliary_head' in c for g in comb.groups
               for c in g.consumers)
    # nn.MultiheadAttention (through mmcv) is pruned into a decoupled
    # module: the residual stream and the head dims are prunable
    stream = comb.group('backbone.patch_embed.projection')
    assert stream.prunable and 'backbone.pos_embed' in stream.passengers


def test_mmseg_pspnet_concat_pyramid():
    cfg = upstream_config(
        'mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py')
    model = build(cfg)
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.7)
    # the bottleneck conv reads the concat of the input and 4 pyramid levels
    bottleneck = [g for g in comb.groups
                  if 'decode_head.bottleneck.conv' in g.consumers]
    assert len(bottleneck) >= 5


@pytest.mark.parametrize('arch', ['t', 's', 'b', 'l'])
def test_seaformer_variants(arch, repo_root):
    cfg = Config.fromfile(osp.join(
        repo_root, f'configs/seaformer/seaformer-{arch}_8xb4-160k_ade20k-'
        '512x512.py'))
    bn = dict(type='BN', requires_grad=True)  # SyncBN needs a process group
    cfg.model.backbone.norm_cfg = bn
    cfg.model.decode_head.norm_cfg = bn
    model = build(cfg)  # SeaFormer zero-inits some BN weights
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.5)
    q = comb.group('backbone.trans1.transformer_blocks.0.attn.to_q.c')
    # key_dim pruned uniformly over heads, with the axial positional
    # embeddings of q and k as passengers
    assert q.granularity.startswith('uniform over')
    assert sum('pos_emb' in p for p in q.passengers) == 4
    attn = pruned.backbone.trans1.transformer_blocks[0].attn
    assert attn.key_dim == int(kept[q.channels].sum())
    assert len(comb.prunable_groups) >= len(comb.groups) - 1
