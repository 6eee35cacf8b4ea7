"""SeaFormer backbone and LightHead: sizes, shapes, key layout, registration,
and the contract the pruning code relies on."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import cpd_mm  # noqa: F401
from cpd_mm.models import LightHead, SeaFormer
from cpd_mm.models.seaformer import SeaAttention

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    a: osp.join(REPO, 'configs', 'seaformer',
                f'seaformer-{a[0]}_8xb4-160k_ade20k-512x512.py')
    for a in ('tiny', 'small', 'base', 'large')
}
# variant: (published M, re-count of the official layers in M) for the
# 150-class ADE20K segmentor, backbone + head.
PUBLISHED = {
    'tiny': (1.7, 1.667),
    'small': (4.0, 3.990),
    'base': (8.6, 8.606),
    'large': (14.0, 13.952),
}
# Our exact counts (stated in cpd_mm/models/seaformer.py): a change to the
# architecture shows up here first.
MEASURED = {
    'tiny': 1_667_318,
    'small': 3_990_118,
    'base': 8_605_654,
    'large': 13_951_510,
}
# Context maps per variant at a 1x3x64x64 input: channels and side length
# (1/32 and 1/64; Large also 1/16). The detail map is at 1/8 (side 8).
CONTEXT = {
    'tiny': [(128, 2), (160, 1)],
    'small': [(160, 2), (192, 1)],
    'base': [(192, 2), (256, 1)],
    'large': [(192, 4), (256, 2), (320, 1)],
}
DETAIL = {'tiny': 32, 'small': 48, 'base': 64, 'large': 128}


def build_segmentor(arch, num_classes=150):
    """The config's EncoderDecoder, without the ImageNet checkpoint."""
    from mmseg.registry import MODELS
    cfg = Config.fromfile(CONFIGS[arch])
    init_default_scope(cfg.default_scope)
    cfg.model.backbone.init_cfg = None
    cfg.model.decode_head.num_classes = num_classes
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval()


def num_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_param_count_matches_paper(arch):
    model = build_segmentor(arch)
    n = num_params(model)
    published, recount = PUBLISHED[arch]
    assert abs(n / 1e6 - published) <= 0.02 * published, n
    # the re-count is rounded to 1e3 parameters
    assert abs(n / 1e6 - recount) <= 0.0005, n
    assert n == MEASURED[arch]
    assert isinstance(model.backbone, SeaFormer)
    assert isinstance(model.decode_head, LightHead)


@pytest.mark.parametrize('arch', list(PUBLISHED))
def test_output_shapes(arch):
    model = build_segmentor(arch, num_classes=7)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)
        logits = model(x, mode='tensor')
    shapes = [tuple(f.shape) for f in feats]
    assert shapes[0] == (1, DETAIL[arch], 8, 8)
    assert shapes[1:] == [(1, c, s, s) for c, s in CONTEXT[arch]]
    assert model.backbone.out_channels == [s[1] for s in shapes]
    assert logits.shape == (1, 7, 8, 8)  # logits at 1/8
    assert torch.isfinite(logits).all()


def test_input_not_divisible_by_64():
    """Strided convs round up; the head upsamples context maps to the 1/8
    map, so any input size works (the positional embeddings are resized)."""
    model = build_segmentor('tiny', num_classes=5)
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 72, 100))
        logits = model(torch.randn(2, 3, 72, 100), mode='tensor')
    assert [tuple(f.shape[2:]) for f in feats] == [(9, 13), (3, 4), (2, 2)]
    assert logits.shape == (2, 5, 9, 13)


def test_state_dict_follows_official_layout():
    shapes = {k: tuple(v.shape)
              for k, v in build_segmentor('tiny').state_dict().items()}
    expected = {
        'backbone.smb1.stem_block.0.c.weight': (16, 3, 3, 3),
        'backbone.smb1.layer1.conv.0.c.weight': (16, 1, 3, 3),  # t = 1
        'backbone.smb2.layer1.conv.0.c.weight': (48, 16, 1, 1),
        'backbone.smb2.layer1.conv.2.bn.running_var': (48, ),
        'backbone.smb2.layer1.conv.4.c.weight': (32, 48, 1, 1),
        'backbone.trans1.transformer_blocks.0.attn.to_q.c.weight':
        (64, 128, 1, 1),
        'backbone.trans1.transformer_blocks.0.attn.pos_emb_rowq.pos_embed':
        (1, 64, 16),
        'backbone.trans1.transformer_blocks.0.attn.pos_emb_columnk.pos_embed':
        (1, 64, 16),
        'backbone.trans1.transformer_blocks.0.attn.dwconv.c.weight':
        (256, 1, 3, 3),
        'backbone.trans1.transformer_blocks.0.attn.proj_encode_row.1.c.weight':
        (128, 128, 1, 1),
        'backbone.trans1.transformer_blocks.0.attn.proj.1.bn.weight': (128, ),
        'backbone.trans1.transformer_blocks.0.mlp.dwconv.weight':
        (256, 1, 3, 3),
        'backbone.trans1.transformer_blocks.0.mlp.dwconv.bias': (256, ),
        'backbone.trans2.transformer_blocks.1.attn.to_v.c.weight':
        (192, 160, 1, 1),
        'decode_head.fuse1.local_embedding.conv.weight': (64, 32, 1, 1),
        'decode_head.fuse1.global_act.bn.weight': (64, ),
        'decode_head.fuse2.global_act.conv.weight': (96, 160, 1, 1),
        'decode_head.linear_fuse.conv.weight': (96, 1, 1, 1),
        'decode_head.conv_seg.weight': (150, 96, 1, 1),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert 'backbone.trans1.transformer_blocks.0.attn.to_q.c.bias' \
        not in shapes  # Conv2d_BN convs have no bias


def test_registered_in_root_registry_for_mmseg_scope():
    from mmengine.registry import MODELS as ROOT
    from mmseg.registry import MODELS as MMSEG
    assert ROOT.get('SeaFormer') is SeaFormer
    assert ROOT.get('LightHead') is LightHead
    init_default_scope('mmseg')
    # mmseg's registry falls back to the root one for plain type names
    assert MMSEG.get('SeaFormer') is SeaFormer
    backbone = MMSEG.build(dict(type='SeaFormer', arch='small'))
    assert isinstance(backbone, SeaFormer)
    assert backbone.out_channels == [48, 160, 192]
    with pytest.raises(KeyError, match='arch'):
        SeaFormer(arch='huge')


def test_config_recipe():
    cfg = Config.fromfile(CONFIGS['tiny'])
    assert cfg.default_scope == 'mmseg'
    assert cfg.custom_imports.imports == ['cpd_mm']
    optim = cfg.optim_wrapper
    assert optim.optimizer.type == 'AdamW' and optim.optimizer.lr == 5e-4
    assert optim.optimizer.weight_decay == 0.01
    assert optim.paramwise_cfg.custom_keys['pos_emb'] == dict(decay_mult=0.)
    assert optim.paramwise_cfg.custom_keys['head'] == dict(lr_mult=10.)
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR',
                                                              1e-6, 1500)
    assert (poly.type, poly.power, poly.end) == ('PolyLR', 1.0, 160000)
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.model.backbone.norm_cfg.type == 'SyncBN'
    # test images are resized to a multiple of 32, labels keep their size
    from mmcv.transforms import Compose
    init_default_scope('mmseg')
    pipeline = cfg.val_dataloader.dataset.pipeline
    types = [t['type'] for t in pipeline]
    assert types.index('ResizeToMultiple') < types.index('LoadAnnotations')
    resize = Compose([t for t in pipeline if 'Resize' in t['type']])
    img = torch.zeros(300, 700, 3, dtype=torch.uint8).numpy()
    out = resize(dict(img=img, img_shape=img.shape[:2],
                      ori_shape=img.shape[:2]))
    h, w = out['img'].shape[:2]
    assert h % 32 == 0 and w % 32 == 0 and min(h, w) == 512, (h, w)

    large = Config.fromfile(CONFIGS['large'])
    assert large.model.decode_head.in_index == [0, 1, 2, 3]
    assert large.optim_wrapper.optimizer.lr == 5e-4  # inherited

    # what the custom keys do to the parameter groups
    from mmengine.optim import build_optim_wrapper
    model = build_segmentor('tiny')
    groups = build_optim_wrapper(model, cfg.optim_wrapper).param_groups
    by_param = {id(g['params'][0]): g for g in groups}
    params = dict(model.named_parameters())

    def lr_wd(name):
        group = by_param[id(params[name])]
        return group['lr'], group['weight_decay']

    blk = 'backbone.trans1.transformer_blocks.0.'
    assert lr_wd(blk + 'attn.pos_emb_rowq.pos_embed') == (5e-4, 0.)
    assert lr_wd(blk + 'attn.to_q.c.weight') == (5e-4, 0.01)
    assert lr_wd(blk + 'attn.to_q.bn.weight') == (5e-4, 0.)
    assert lr_wd('decode_head.conv_seg.weight') == (5e-3, 0.01)
    assert lr_wd('decode_head.fuse1.global_act.bn.weight') == (5e-3, 0.01)


def _slice_conv_bn(cbn, out_idx=None, in_idx=None):
    """Keep output channels ``out_idx`` / input channels ``in_idx`` of a
    Conv2d_BN (a depthwise conv keeps both through ``out_idx``)."""
    conv, bn = cbn.c, cbn.bn
    w = conv.weight.data
    if out_idx is not None:
        w = w[out_idx]
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            t = getattr(bn, name)
            t.data = t.data[out_idx]
        bn.num_features = len(out_idx)
        if conv.groups > 1:
            conv.groups = len(out_idx)
        conv.out_channels = len(out_idx)
    if in_idx is not None:
        w = w[:, in_idx]
        conv.in_channels = len(in_idx)
    conv.weight.data = w.clone()
    if conv.groups > 1:
        conv.in_channels = conv.out_channels


def test_key_dim_prune_keeps_output_with_stored_scale():
    """What surgery will do to a SeaAttention: drop half of every head's
    q/k channels whose values are zero. The pruned module, with the updated
    width attributes and the untouched ``scale``, gives the same output."""
    torch.manual_seed(0)
    attn = SeaAttention(dim=32, key_dim=8, num_heads=2).eval()
    for m in attn.modules():  # random but well-conditioned BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.running_var.data.uniform_(0.5, 1.5)
    drop = [j + h * 8 for h in range(2) for j in range(4, 8)]
    keep = [c for c in range(16) if c not in drop]
    for name in ('to_q', 'to_k'):  # make the dropped q/k channels zero
        bn = getattr(attn, name).bn
        bn.weight.data[drop] = 0
        bn.bias.data[drop] = 0
        bn.running_mean.data[drop] = 0
    for name in ('rowq', 'rowk', 'columnq', 'columnk'):
        getattr(attn, f'pos_emb_{name}').pos_embed.data[:, drop] = 0
    attn.dwconv.bn.bias.data[drop] = 0  # zero in -> zero out of the detail
    attn.dwconv.bn.bias.data[[16 + c for c in drop]] = 0  # branch
    attn.dwconv.bn.running_mean.data[drop] = 0
    attn.dwconv.bn.running_mean.data[[16 + c for c in drop]] = 0
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        ref = attn(x)

    qkv_keep = keep + [16 + c for c in keep] + list(range(32, 32 + 32))
    _slice_conv_bn(attn.to_q, out_idx=keep)
    _slice_conv_bn(attn.to_k, out_idx=keep)
    _slice_conv_bn(attn.dwconv, out_idx=qkv_keep)
    _slice_conv_bn(attn.pwconv, in_idx=qkv_keep)
    for name in ('rowq', 'rowk', 'columnq', 'columnk'):
        emb = getattr(attn, f'pos_emb_{name}')
        emb.pos_embed.data = emb.pos_embed.data[:, keep].clone()
    attn.key_dim, attn.nh_kd = 4, 8
    with torch.no_grad():
        out = attn(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # a scale re-derived from the new key_dim would change the result
    attn.scale = 4**-0.5
    with torch.no_grad():
        assert not torch.allclose(attn(x), ref, rtol=1e-3, atol=1e-4)


def test_demo_config_trains_every_parameter():
    """One loss step of the CPU demo model: finite loss, and every parameter
    gets a gradient (DDP needs no find_unused_parameters)."""
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'demo',
                                   'seaformer-t_demo-seg.py'))
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    assert model.decode_head.num_classes == 5
    torch.manual_seed(0)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64),
                                             ori_shape=(64, 64),
                                             pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, 5, (1, 64, 64)))
        samples.append(sample)
    losses = model.loss(torch.randn(2, 3, 64, 64), samples)
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
