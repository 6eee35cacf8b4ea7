"""The zoo: one model per family of MMPretrain 1.2.0, MMSegmentation 1.2.2
and torchvision, and how to build each with random weights.

A family is a config directory of the installed package
(``<pkg>/.mim/configs/<family>/``) or a torchvision model name without its
size suffix. The representative is the smallest variant with a supervised
classifier / segmentor config (for self-supervised families: their
fine-tune or linear-eval benchmark config). :func:`missing_families` lists
directories and torchvision models that the table does not cover, so a new
release shows up. ``size`` fixes the input side where the automatic choice
would be wrong or too slow; ``cfg`` shrinks a fixed native resolution
(relative-position tables sized for 512-640 px) without changing the
architecture.
"""
import os
import os.path as osp
import re

_NEEDS_DOWNLOAD = ('multimodal: needs a tokenizer / language model from the '
                   'Hugging Face hub (no downloads here)')


class Entry:
    """One model of the zoo (see the module docstring)."""

    def __init__(self, codebase, family, name, size=None, cfg=None, skip='',
                 in_channels=3, model=None):
        self.codebase, self.family, self.name = codebase, family, name
        short = {'torchvision': 'tv'}.get(codebase, codebase)
        self.key = f'{short}/{family}'
        self.size, self.cfg, self.skip = size, cfg or {}, skip
        self.in_channels = in_channels
        self.model = model  # a model dict, where the config does not load
        self.native = 224

    def __repr__(self):
        return f'Entry({self.key}: {self.name})'

    # -------------------------------------------------------------- build
    def build(self):
        """The model with random weights, in eval mode."""
        if self.codebase == 'torchvision':
            import torchvision
            kw = dict(weights=None)
            if self.name in torchvision.models.list_models(
                    module=torchvision.models.segmentation):
                kw['weights_backbone'] = None  # default would download
            model = torchvision.models.get_model(self.name, **kw)
        else:
            model = self._build_mm()
        model.eval()  # some backbones' train() returns None
        return model

    def _build_mm(self):
        from mmengine.config import Config, ConfigDict
        from mmengine.registry import MODELS, init_default_scope
        from mmengine.utils import get_installed_path
        import cpd_mm  # noqa: F401 -- registers cpd_mm's modules
        from zoo_check import _tool
        if self.model is not None:
            cfg = Config(dict(model=self.model, default_scope=self.codebase))
        else:
            cfg = Config.fromfile(osp.join(get_installed_path(self.codebase),
                                           '.mim', 'configs', self.family,
                                           self.name))
        if self.cfg:
            cfg.merge_from_dict(self.cfg)
        self.native = _native_size(cfg)
        init_default_scope(cfg.get('default_scope', self.codebase))
        # drop_pretrained returns plain dicts; mmdet heads (MaskFormer)
        # read their sub-configs as attributes: make it a ConfigDict again
        model = MODELS.build(ConfigDict(_tool('check_pruning')
                                        .drop_pretrained(cfg.model)))
        if hasattr(model, 'init_weights'):
            model.init_weights()
        return model

    def sizes(self, model):
        """Input sides to try, smallest first: fixed by the entry, native for
        classifiers with position embeddings or windows, else from 64 up."""
        if self.size:
            return [self.size]
        if self.codebase != 'mmseg' and _has_positional_tables(model):
            return [self.native]
        return sorted({64, 96, 128, 224, self.native})


def _native_size(cfg):
    """Input side the config was made for (backbone img_size, else crop)."""
    bb = cfg.model.get('backbone', {}) or {}
    for src in (bb.get('img_size'), cfg.get('crop_size')):
        if isinstance(src, int):
            return src
        if isinstance(src, (tuple, list)) and src:
            return int(min(src))
    return 224


def _has_positional_tables(model):
    pat = re.compile(r'pos_embed|position|attention_bias|rel_pos|relative')
    if any(pat.search(n) for n, _ in model.named_parameters()):
        return True
    return any(hasattr(m, 'window_size') for m in model.modules())


# ------------------------------------------------------------------ tables
def _mmpretrain():
    E = lambda fam, name, **kw: Entry('mmpretrain', fam, name, **kw)  # noqa
    lin = 'benchmarks/resnet50_8xb32-linear-steplr-100e_in1k.py'
    out = [
        E('arcface', 'resnet50-arcface_8xb32_inshop.py'),
        E('barlowtwins', 'benchmarks/resnet50_8xb32-linear-coslr-100e_in1k.py'),
        E('beit', 'benchmarks/beit-base-p16_8xb64_in1k.py'),
        E('beitv2', 'benchmarks/beit-base-p16_8xb64_in1k.py'),
        E('byol', 'benchmarks/resnet50_8xb512-linear-coslr-90e_in1k.py'),
        E('cae', 'benchmarks/beit-base-p16_8xb128-coslr-100e_in1k.py'),
        E('clip', 'vit-base-p32_pt-64xb64_in1k.py'),
        E('conformer', 'conformer-tiny-p16_8xb128_in1k.py'),
        E('convmixer', 'convmixer-768-32_10xb64_in1k.py'),
        E('convnext', 'convnext-tiny_32xb128_in1k.py'),
        E('convnext_v2', 'convnext-v2-atto_32xb32_in1k.py'),
        E('cspnet', 'cspresnet50_8xb32_in1k.py'),
        E('csra', 'resnet101-csra_1xb16_voc07-448px.py'),
        E('davit', 'davit-tiny_4xb256_in1k.py'),
        E('deit', 'deit-tiny_4xb256_in1k.py'),
        E('deit3', 'deit3-small-p16_64xb64_in1k.py'),
        E('densecl', lin),
        E('densenet', 'densenet121_4xb256_in1k.py'),
        E('dinov2', 'vit-small-p14_dinov2-pre_headless.py', size=224,
          cfg={'model.backbone.img_size': 224}),
        E('edgenext', 'edgenext-xxsmall_8xb256_in1k.py'),
        E('efficientformer', 'efficientformer-l1_8xb128_in1k.py'),
        E('efficientnet', 'efficientnet-b0_8xb32_in1k.py'),
        E('efficientnet_v2', 'efficientnetv2-b0_8xb32_in1k.py'),
        E('eva', 'benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py'),
        E('eva02', 'eva02-tiny-p14_in1k.py', size=224,
          cfg={'model.backbone.img_size': 224}),
        E('glip', 'glip-t_headless.py'),
        E('hivit', 'hivit-tiny-p16_16xb64_in1k.py'),
        E('hornet', 'hornet-tiny_8xb128_in1k.py'),
        E('hrnet', 'hrnet-w18_4xb32_in1k.py'),
        E('inception_v3', 'inception-v3_8xb32_in1k.py'),
        E('itpn', '', skip='pre-training configs only (iTPN); its HiViT '
          'backbone is covered by hivit'),
        E('lenet', 'lenet5_mnist.py', size=32, in_channels=1),
        E('levit', 'levit-128s_8xb256_in1k.py'),
        E('mae', 'benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py'),
        E('maskfeat', 'benchmarks/vit-base-p16_8xb256-coslr-100e_in1k.py'),
        E('mff', 'benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py'),
        E('milan', 'benchmarks/vit-base-p16_8xb128-coslr-100e_in1k.py'),
        E('mixmim', 'benchmarks/mixmim-base_8xb64_in1k.py'),
        E('mlp_mixer', 'mlp-mixer-base-p16_64xb64_in1k.py'),
        E('mobilenet_v2', 'mobilenet-v2_8xb32_in1k.py'),
        E('mobilenet_v3', 'mobilenet-v3-small-050_8xb128_in1k.py'),
        E('mobileone', 'mobileone-s0_8xb32_in1k.py'),
        E('mobilevit', 'mobilevit-xxsmall_8xb128_in1k.py'),
        E('mocov2', lin),
        E('mocov3', 'benchmarks/vit-small-p16_8xb128-linear-coslr-90e_in1k.py'),
        E('mvit', 'mvitv2-tiny_8xb256_in1k.py'),
        E('poolformer', 'poolformer-s12_32xb128_in1k.py'),
        E('regnet', 'regnetx-400mf_8xb128_in1k.py'),
        # its config imports Python in its base: mmengine refuses to load it
        E('replknet', 'replknet-31B (model of _base_/models/replknet-31B_in1k'
          '.py)', model=dict(
              type='ImageClassifier',
              backbone=dict(type='RepLKNet', arch='31B', out_indices=(3, )),
              neck=dict(type='GlobalAveragePooling'),
              head=dict(type='LinearClsHead', num_classes=1000,
                        in_channels=1024))),
        E('repmlp', 'repmlp-base_8xb64_in1k.py'),
        E('repvgg', 'repvgg-A0_8xb32_in1k.py'),
        E('res2net', 'res2net50-w14-s8_8xb32_in1k.py'),
        E('resnest', 'resnest50_32xb64_in1k.py'),
        E('resnet', 'resnet18_8xb32_in1k.py'),
        E('resnext', 'resnext50-32x4d_8xb32_in1k.py'),
        E('revvit', 'revvit-small_8xb256_in1k.py'),
        E('riformer', 'riformer-s12_8xb128_in1k.py'),
        E('sam', 'vit-base-p16_sam_headless.py', size=224,
          cfg={'model.backbone.img_size': 224}),
        E('seresnet', 'seresnet50_8xb32_in1k.py'),
        E('shufflenet_v1', 'shufflenet-v1-1x_16xb64_in1k.py'),
        E('shufflenet_v2', 'shufflenet-v2-1x_16xb64_in1k.py'),
        E('simclr', 'benchmarks/resnet50_8xb512-linear-coslr-90e_in1k.py'),
        E('simmim', 'benchmarks/swin-base-w6_8xb256-coslr-100e_in1k-192px.py'),
        E('simsiam', 'benchmarks/resnet50_8xb512-linear-coslr-90e_in1k.py'),
        E('spark', 'benchmarks/convnextv2-tiny_8xb256-coslr-300e_in1k.py'),
        E('swav', 'benchmarks/resnet50_8xb512-linear-coslr-90e_in1k.py'),
        E('swin_transformer', 'swin-tiny_16xb64_in1k.py'),
        E('swin_transformer_v2', 'swinv2-tiny-w8_16xb64_in1k-256px.py'),
        E('t2t_vit', 't2t-vit-t-14_8xb64_in1k.py'),
        E('tinyvit', 'tinyvit-5m_8xb256_in1k.py'),
        E('tnt', 'tnt-s-p16_16xb64_in1k.py'),
        E('twins', 'twins-svt-small_8xb128_in1k.py'),
        E('van', 'van-tiny_8xb128_in1k.py'),
        E('vgg', 'vgg11_8xb32_in1k.py'),
        E('vig', 'vig-tiny_8xb128_in1k.py'),
        E('vision_transformer', 'vit-base-p32_64xb64_in1k.py'),
        E('wrn', 'wide-resnet50_8xb32_in1k.py'),
        E('xcit', 'xcit-nano-12-p16_8xb128_in1k.py'),
    ]
    for fam in ('blip', 'blip2', 'chinese_clip', 'flamingo', 'llava',
                'minigpt4', 'ofa', 'otter'):
        out.append(E(fam, '', skip=_NEEDS_DOWNLOAD))
    return out


def _mmseg():
    E = lambda fam, name, **kw: Entry('mmseg', fam, name, **kw)  # noqa
    ade = '4xb4-80k_ade20k-512x512.py'
    out = [E(f, f'{n}_r50-d8_{ade}') for f, n in (
        ('ann', 'ann'), ('apcnet', 'apcnet'), ('ccnet', 'ccnet'),
        ('danet', 'danet'), ('dmnet', 'dmnet'), ('dnlnet', 'dnl'),
        ('encnet', 'encnet'), ('gcnet', 'gcnet'), ('isanet', 'isanet'),
        ('nonlocal_net', 'nonlocal'), ('psanet', 'psanet'))]
    out += [
        E('beit', 'beit-base_upernet_8xb2-160k_ade20k-640x640.py', size=64,
          cfg={'model.backbone.img_size': (64, 64)}),
        E('bisenetv1', 'bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024.py'),
        E('bisenetv2', 'bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024.py'),
        E('cgnet', 'cgnet_fcn_4xb8-60k_cityscapes-512x1024.py'),
        E('convnext', 'convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py'),
        E('ddrnet', 'ddrnet_23-slim_in1k-pre_2xb6-120k_cityscapes-'
          '1024x1024.py'),
        E('deeplabv3', 'deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py'),
        E('deeplabv3plus',
          'deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024.py'),
        E('dpt', 'dpt_vit-b16_8xb2-160k_ade20k-512x512.py'),
        E('dsdl', '', skip='data set format configs, no model'),
        E('emanet', 'emanet_r50-d8_4xb2-80k_cityscapes-512x1024.py'),
        E('erfnet', 'erfnet_fcn_4xb4-160k_cityscapes-512x1024.py'),
        E('fastfcn', 'fastfcn_r50-d32_jpu_psp_4xb4-80k_ade20k-512x512.py'),
        E('fastscnn', 'fast_scnn_8xb4-160k_cityscapes-512x1024.py'),
        E('fcn', 'fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py'),
        E('hrnet', 'fcn_hr18s_4xb4-80k_ade20k-512x512.py'),
        E('icnet', 'icnet_r18-d8_4xb2-80k_cityscapes-832x832.py'),
        E('knet', 'knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.py'),
        E('mae', 'mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py', size=64,
          cfg={'model.backbone.img_size': (64, 64)}),
        E('mask2former', 'mask2former_r50_8xb2-160k_ade20k-512x512.py'),
        E('maskformer', 'maskformer_r50-d32_8xb2-160k_ade20k-512x512.py'),
        E('mobilenet_v2', 'mobilenet-v2-d8_fcn_4xb4-160k_ade20k-512x512.py'),
        E('mobilenet_v3', 'mobilenet-v3-d8-s_lraspp_4xb4-320k_cityscapes-'
          '512x1024.py'),
        E('ocrnet', 'ocrnet_hr18s_4xb4-80k_ade20k-512x512.py'),
        E('pidnet', 'pidnet-s_2xb6-120k_1024x1024-cityscapes.py'),
        E('point_rend', 'pointrend_r50_4xb4-160k_ade20k-512x512.py'),
        E('poolformer', 'fpn_poolformer_s12_8xb4-40k_ade20k-512x512.py'),
        E('pspnet', 'pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py'),
        E('resnest', 'resnest_s101-d8_fcn_4xb4-160k_ade20k-512x512.py'),
        E('san', '', skip='no config in the installed package (CLIP-based; '
          'would need a download)'),
        E('segformer', 'segformer_mit-b0_8xb2-160k_ade20k-512x512.py'),
        E('segmenter', 'segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py'),
        E('segnext', 'segnext_mscan-t_1xb16-adamw-160k_ade20k-512x512.py'),
        E('sem_fpn', 'fpn_r50_4xb4-160k_ade20k-512x512.py'),
        E('setr', 'setr_vit-l_naive_8xb2-160k_ade20k-512x512.py'),
        E('stdc', 'stdc1_4xb12-80k_cityscapes-512x1024.py'),
        E('swin', 'swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
          'ade20k-512x512.py'),
        E('twins', 'twins_pcpvt-s_fpn_fpnhead_8xb4-80k_ade20k-512x512.py'),
        E('unet', 'unet-s5-d16_fcn_4xb4-160k_cityscapes-512x1024.py'),
        E('upernet', 'upernet_r18_4xb4-80k_ade20k-512x512.py'),
        E('vit', 'vit_deit-s16_upernet_8xb2-80k_ade20k-512x512.py'),
        E('vpd', '', skip='no config in the installed package (Stable '
          'Diffusion based; would need a download)'),
    ]
    return out


# torchvision: family -> smallest member (the family is the name prefix)
_TV = {
    'alexnet': 'alexnet', 'convnext': 'convnext_tiny',
    'densenet': 'densenet121', 'efficientnet': 'efficientnet_b0',
    'efficientnet_v2': 'efficientnet_v2_s', 'googlenet': 'googlenet',
    'inception_v3': 'inception_v3', 'maxvit': 'maxvit_t',
    'mnasnet': 'mnasnet0_5', 'mobilenet_v2': 'mobilenet_v2',
    'mobilenet_v3': 'mobilenet_v3_small', 'regnet_x': 'regnet_x_400mf',
    'regnet_y': 'regnet_y_400mf', 'resnet': 'resnet18',
    'resnext': 'resnext50_32x4d', 'shufflenet_v2': 'shufflenet_v2_x0_5',
    'squeezenet': 'squeezenet1_1', 'swin': 'swin_t', 'swin_v2': 'swin_v2_t',
    'vgg': 'vgg11', 'vit': 'vit_b_32', 'wide_resnet': 'wide_resnet50_2',
    # segmentation
    'deeplabv3': 'deeplabv3_mobilenet_v3_large', 'fcn': 'fcn_resnet50',
    'lraspp': 'lraspp_mobilenet_v3_large',
}


def _tv_family(name):
    """Longest family prefix of a torchvision model name."""
    fams = [f for f in _TV if name == f or name.startswith(f + '_') or
            re.match(re.escape(f) + r'\d', name)]
    return max(fams, key=len) if fams else None


def all_entries():
    tv = [Entry('torchvision', f, n) for f, n in sorted(_TV.items())]
    return _mmpretrain() + _mmseg() + tv


def missing_families():
    """Config directories and torchvision models no entry covers."""
    from mmengine.utils import get_installed_path
    import torchvision
    have = {(e.codebase, e.family) for e in all_entries()}
    out = []
    for pkg in ('mmpretrain', 'mmseg'):
        root = osp.join(get_installed_path(pkg), '.mim', 'configs')
        for d in sorted(os.listdir(root)):
            if osp.isdir(osp.join(root, d)) and not d.startswith('_') \
                    and (pkg, d) not in have:
                out.append(f'{pkg}/{d}')
    for mod in (torchvision.models, torchvision.models.segmentation):
        for n in torchvision.models.list_models(module=mod):
            if _tv_family(n) is None:
                out.append(f'torchvision/{n}')
    return out


# A short list that CI runs in-process (tests/test_zoo_coverage.py): small
# models, one per construct that needed its own rule (issue 12), on a real
# instance, plus exact references:
# channel-first LayerNorm (convnext), split -> conv chains (res2net), unequal
# chunks with mixed depthwise kernels (edgenext), per-head / per-position
# attention biases and head-axis projections (efficientformer, tinyvit,
# xcit), shifted windows with roll and relative bias (swin), cascade decode
# heads (ocrnet), x * attn(x) with large depthwise kernels (van, segnext),
# pooling token mixers (poolformer), classifiers over flattened maps
# (alexnet).
CI_SUBSET = (
    'tv/resnet', 'tv/lraspp', 'mmpretrain/deit', 'mmpretrain/poolformer',
    'mmseg/segnext', 'mmpretrain/convnext', 'mmpretrain/res2net',
    'mmpretrain/tinyvit', 'mmpretrain/van', 'mmpretrain/xcit', 'mmseg/ocrnet',
    'mmpretrain/edgenext', 'mmpretrain/efficientformer',
    'mmpretrain/swin_transformer', 'tv/alexnet',
)
