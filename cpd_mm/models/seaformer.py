"""SeaFormer backbone (Wan et al., "SeaFormer: Squeeze-enhanced Axial
Transformer for Mobile Semantic Segmentation", ICLR 2023).

A MobileNetV2 stem of five stacks ``smb1``..``smb5`` followed by stacks of
squeeze-enhanced axial attention blocks ``trans1``.. after the last two (or,
for Large, three) MobileNetV2 stacks. Parameter names follow the official
checkpoints (fudan-zvg/SeaFormer), so official ImageNet weights load directly
through ``init_cfg=dict(type='Pretrained', checkpoint=...)`` and official
ADE20K weights load with ``load_from`` (see ``tools/convert_seaformer.py``).

Size of the ADE20K segmentation model (this backbone + ``LightHead``, 150
classes), measured by ``tests/test_seaformer.py``; FLOPs (multiply-adds, as
the paper counts) by ``mmengine.analysis.get_model_complexity_info`` at
1x3x512x512 (paper's in parentheses). "official code" re-counts its layers.

=======  ==========  ==========  ============  =============  ==========
variant  backbone    seg model   paper params  official code  GFLOPs
=======  ==========  ==========  ============  =============  ==========
tiny     1,620,096   1,667,318   1.7M          1.667M         0.60 (0.6)
small    3,912,656   3,990,118   4.0M          3.990M         1.07 (1.1)
base     8,485,664   8,605,654   8.6M          8.606M         1.81 (1.8)
large    13,725,504  13,951,510  14.0M         13.952M        6.48 (6.5)
=======  ==========  ==========  ============  =============  ==========

Written for channel pruning: reshapes use the modules' width attributes
(``num_heads``, ``key_dim``, ``d``, ``dh``), which surgery updates; the
attention scale is the stored ``scale``, unchanged when ``key_dim`` shrinks;
no op writes in place.
"""
import copy
import math

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks import DropPath
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from torch import nn

from .seaformer_checkpoint import load_backbone_state_dict


class Conv2d_BN(nn.Sequential):
    """Bias-free convolution ``c`` followed by a norm layer ``bn`` whose
    weight starts at ``bn_weight_init``."""

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1,
                 padding=0, groups=1, bn_weight_init=1.0,
                 norm_cfg=dict(type='BN')):
        super().__init__()
        self.add_module('c', nn.Conv2d(in_channels, out_channels, kernel_size,
                                       stride, padding, groups=groups,
                                       bias=False))
        bn = build_norm_layer(norm_cfg, out_channels)[1]
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module('bn', bn)


class HardSigmoid(nn.Module):
    """``ReLU6(x + 3) / 6``, with the ReLU6 as a submodule."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6()

    def forward(self, x):
        return self.relu(x + 3) / 6


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand + ReLU], kxk depthwise + ReLU, 1x1.
    Submodules are ``conv.0``, ``conv.2``[, ``conv.4``] as in the official
    checkpoints; the residual is added only if stride is 1 and widths match.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride,
                 expand_ratio, norm_cfg=dict(type='BN')):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f'`stride` must be 1 or 2, but got {stride}')
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers += [Conv2d_BN(in_channels, hidden, norm_cfg=norm_cfg),
                       nn.ReLU()]
        layers += [
            Conv2d_BN(hidden, hidden, kernel_size, stride, kernel_size // 2,
                      groups=hidden, norm_cfg=norm_cfg),
            nn.ReLU(),
            Conv2d_BN(hidden, out_channels, norm_cfg=norm_cfg),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class StackedMV2Block(nn.Module):
    """Inverted residuals ``layer1``.. from ``[k, t, c, s]`` rows; the first
    stack also owns the stem (``stem_block``: 3x3/2 conv + ReLU from RGB)."""

    def __init__(self, cfgs, in_channels, stem=False,
                 norm_cfg=dict(type='BN')):
        super().__init__()
        self.stem = stem
        if stem:
            self.stem_block = nn.Sequential(
                Conv2d_BN(3, in_channels, 3, 2, 1, norm_cfg=norm_cfg),
                nn.ReLU())
        self.num_layers = len(cfgs)
        for i, (k, t, c, s) in enumerate(cfgs):
            self.add_module(
                f'layer{i + 1}',
                InvertedResidual(in_channels, c, k, s, t, norm_cfg=norm_cfg))
            in_channels = c

    def forward(self, x):
        if self.stem:
            x = self.stem_block(x)
        for i in range(self.num_layers):
            x = getattr(self, f'layer{i + 1}')(x)
        return x


class SqueezeAxialPositionalEmbedding(nn.Module):
    """Adds ``pos_embed`` (1, C, length), linearly resized to the input's
    length, to a squeezed (B, C, N) tensor."""

    def __init__(self, channels, length=16):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, channels, length))

    def forward(self, x):
        pos = F.interpolate(self.pos_embed, size=x.shape[-1], mode='linear',
                            align_corners=False)
        return x + pos


class SeaAttention(nn.Module):
    """Squeeze-enhanced axial attention with a detail-enhancement branch.

    q, k (``key_dim`` per head) and v (``d`` per head) come from 1x1 convs.
    Row attention runs on the width-averaged (B, C, H) tensors, column
    attention on the height-averaged (B, C, W) ones, each with learnt
    positional embeddings; their sum is broadcast back onto v. The result,
    through ``proj`` and a hard sigmoid, gates the detail branch (depthwise +
    pointwise conv over concat[q, k, v]).
    """

    def __init__(self, dim, key_dim, num_heads, attn_ratio=2.0,
                 act_layer=nn.ReLU6, norm_cfg=dict(type='BN')):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.nh_kd = key_dim * num_heads
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        # Stored, never re-derived from shapes: pruning key_dim must not
        # change the softmax temperature.
        self.scale = key_dim**-0.5
        nh_kd, dh = self.nh_kd, self.dh

        self.to_q = Conv2d_BN(dim, nh_kd, norm_cfg=norm_cfg)
        self.to_k = Conv2d_BN(dim, nh_kd, norm_cfg=norm_cfg)
        self.to_v = Conv2d_BN(dim, dh, norm_cfg=norm_cfg)

        def act_proj(out_channels):  # zero-init BN: the branch starts at 0
            return nn.Sequential(
                act_layer(),
                Conv2d_BN(dh, out_channels, bn_weight_init=0,
                          norm_cfg=norm_cfg))

        self.proj = act_proj(dim)
        self.proj_encode_row = act_proj(dh)
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(nh_kd)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(nh_kd)
        self.proj_encode_column = act_proj(dh)
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(nh_kd)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(nh_kd)

        qkv_channels = 2 * nh_kd + dh
        self.dwconv = Conv2d_BN(qkv_channels, qkv_channels, 3, 1, 1,
                                groups=qkv_channels, norm_cfg=norm_cfg)
        self.act = act_layer()
        self.pwconv = Conv2d_BN(qkv_channels, dim, norm_cfg=norm_cfg)
        self.hsigmoid = HardSigmoid()

    def _axial(self, q, k, v, pos_q, pos_k):
        """Attention along one axis of length N for squeezed (B, C, N) q, k,
        v; returns (B, dh, N)."""
        B, N = q.shape[0], q.shape[-1]
        q = pos_q(q).reshape(B, self.num_heads, self.key_dim, N)
        k = pos_k(k).reshape(B, self.num_heads, self.key_dim, N)
        v = v.reshape(B, self.num_heads, self.d, N)
        attn = torch.matmul(q.transpose(-1, -2), k) * self.scale
        attn = attn.softmax(dim=-1)
        out = torch.matmul(attn, v.transpose(-1, -2))  # B, heads, N, d
        return out.transpose(-1, -2).reshape(B, self.dh, N)

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)

        detail = self.pwconv(self.act(self.dwconv(torch.cat([q, k, v], 1))))

        row = self._axial(q.mean(-1), k.mean(-1), v.mean(-1),
                          self.pos_emb_rowq, self.pos_emb_rowk)
        row = self.proj_encode_row(row.reshape(B, self.dh, H, 1))
        col = self._axial(q.mean(-2), k.mean(-2), v.mean(-2),
                          self.pos_emb_columnq, self.pos_emb_columnk)
        col = self.proj_encode_column(col.reshape(B, self.dh, 1, W))

        xx = v + (row + col)  # (B,dh,H,1) + (B,dh,1,W) broadcasts to H x W
        return self.hsigmoid(self.proj(xx)) * detail


class Mlp(nn.Module):
    """1x1 Conv2d_BN, 3x3 depthwise conv with bias, act, 1x1 Conv2d_BN."""

    def __init__(self, dim, hidden, act_layer=nn.ReLU6,
                 norm_cfg=dict(type='BN')):
        super().__init__()
        self.fc1 = Conv2d_BN(dim, hidden, norm_cfg=norm_cfg)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = act_layer()
        self.fc2 = Conv2d_BN(hidden, dim, norm_cfg=norm_cfg)

    def forward(self, x):
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class Block(nn.Module):
    """``x + DropPath(attn(x))`` then ``x + DropPath(mlp(x))``, no norms."""

    def __init__(self, dim, key_dim, num_heads, mlp_ratio=4.0, attn_ratio=2.0,
                 drop_path=0.0, act_layer=nn.ReLU6, norm_cfg=dict(type='BN')):
        super().__init__()
        self.attn = SeaAttention(dim, key_dim, num_heads, attn_ratio,
                                 act_layer, norm_cfg)
        self.drop_path = (DropPath(drop_path) if drop_path > 0 else
                          nn.Identity())
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, norm_cfg)

    def forward(self, x):
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    """A stage of blocks (``drop_path``: one rate per block)."""

    def __init__(self, depth, dim, key_dim, num_heads, mlp_ratio, attn_ratio,
                 drop_path, act_layer=nn.ReLU6, norm_cfg=dict(type='BN')):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            Block(dim, key_dim, num_heads, mlp_ratio, attn_ratio,
                  drop_path[i], act_layer, norm_cfg) for i in range(depth))

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


@MODELS.register_module()
class SeaFormer(BaseModule):
    """SeaFormer backbone for MMSegmentation.

    Args:
        arch (str | dict): 'tiny', 'small', 'base', 'large' (see
            ``ARCH_SETTINGS`` at the end of this file) or a dict with the
            keys of one of its entries. Default: 'tiny'.
        drop_path_rate (float): Stochastic depth of the last block of each
            attention stage, ``linspace(0, rate, depth)`` per stage.
            Default: 0.1.
        norm_cfg (dict): Norm layer of every Conv2d_BN. Default: BN
            (the ADE20K configs use SyncBN).
        act_layer (type): Activation of the attention blocks (the MobileNetV2
            stacks always use ReLU). Default: ``nn.ReLU6``.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=path,
            use_ema=True)`` loads an official ImageNet checkpoint (or one
            written by ``tools/convert_seaformer.py``) strictly: keys that do
            not belong to the backbone (classifier ``linear.*``, a
            ``decode_head.*``) are dropped, a missing or mis-shaped backbone
            key raises. ``use_ema`` takes ``state_dict_ema`` when the file has
            it, as the official segmentation code does. Without ``init_cfg``
            the official random init is used. Default: None.

    ``forward`` returns the smb2 output (1/8) and each attention stage's
    output (1/32, 1/64; Large also 1/16 first) as a tuple.
    """

    def __init__(self, arch='tiny', drop_path_rate=0.1,
                 norm_cfg=dict(type='BN', requires_grad=True),
                 act_layer=nn.ReLU6, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if isinstance(arch, str):
            if arch not in ARCH_SETTINGS:
                raise KeyError(f'`arch` must be one of '
                               f'{sorted(ARCH_SETTINGS)}, but got {arch!r}')
            arch = ARCH_SETTINGS[arch]
        missing = set(ARCH_SETTINGS['tiny']) - set(arch)
        if missing:
            raise KeyError(f'custom `arch` lacks keys {sorted(missing)}')
        self.arch = copy.deepcopy(arch)
        cfgs, channels = arch['cfgs'], arch['channels']
        self.num_smb = len(cfgs)
        self.num_trans = len(arch['depths'])
        self.out_channels = [channels[2]] + list(arch['emb_dims'])

        for i, cfg in enumerate(cfgs):
            self.add_module(
                f'smb{i + 1}',
                StackedMV2Block(cfg, channels[i], stem=i == 0,
                                norm_cfg=norm_cfg))
        for i, depth in enumerate(arch['depths']):
            dpr = torch.linspace(0, drop_path_rate, depth).tolist()
            self.add_module(
                f'trans{i + 1}',
                BasicLayer(depth, arch['emb_dims'][i], arch['key_dims'][i],
                           arch['num_heads'], arch['mlp_ratios'][i],
                           arch['attn_ratio'], dpr, act_layer, norm_cfg))

    def init_weights(self):
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            state_dict = load_backbone_state_dict(
                cfg['checkpoint'], self, use_ema=cfg.get('use_ema', True))
            self.load_state_dict(state_dict, strict=True)
        elif cfg is None:
            self._official_init()
        else:
            return super().init_weights()
        self._is_init = True

    def _official_init(self):
        """He-normal convs (fan-out per group). Norms keep what Conv2d_BN
        set (weight 1, or 0 on ``proj*``), as in the official code with SyncBN
        (its BN re-init only matches ``nn.BatchNorm2d``)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / (n // m.groups)))
                if m.bias is not None:
                    m.bias.data.zero_()

    def forward(self, x):
        outs = []
        first_trans = self.num_smb - self.num_trans
        for i in range(self.num_smb):
            x = getattr(self, f'smb{i + 1}')(x)
            if i == 1:
                outs.append(x)  # the shared 1/8 detail feature
            if i >= first_trans:
                x = getattr(self, f'trans{i - first_trans + 1}')(x)
                outs.append(x)
        return tuple(outs)


# Variants, from the official configs. ``cfgs``: per MobileNetV2 stack, rows of
# [kernel, expand ratio, out channels, stride]; ``channels[i]``: input width of
# smb{i+1} (channels[0] is the stem's output).
ARCH_SETTINGS = {
    'tiny': dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 16, 2], [3, 3, 16, 1]],
              [[5, 3, 32, 2], [5, 3, 32, 1]], [[3, 3, 64, 2], [3, 3, 64, 1]],
              [[5, 3, 128, 2]], [[3, 6, 160, 2]]],
        channels=[16, 16, 32, 64, 128, 160], emb_dims=[128, 160],
        key_dims=[16, 24], depths=[2, 2], num_heads=4, mlp_ratios=[2, 4],
        attn_ratio=2),
    'small': dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 24, 2], [3, 3, 24, 1]],
              [[5, 3, 48, 2], [5, 3, 48, 1]], [[3, 3, 96, 2], [3, 3, 96, 1]],
              [[5, 4, 160, 2]], [[3, 6, 192, 2]]],
        channels=[16, 24, 48, 96, 160, 192], emb_dims=[160, 192],
        key_dims=[16, 24], depths=[3, 3], num_heads=6, mlp_ratios=[2, 4],
        attn_ratio=2),
    'base': dict(
        cfgs=[[[3, 1, 16, 1], [3, 4, 32, 2], [3, 3, 32, 1]],
              [[5, 3, 64, 2], [5, 3, 64, 1]], [[3, 3, 128, 2], [3, 3, 128, 1]],
              [[5, 4, 192, 2]], [[3, 6, 256, 2]]],
        channels=[16, 32, 64, 128, 192, 256], emb_dims=[192, 256],
        key_dims=[16, 24], depths=[4, 4], num_heads=8, mlp_ratios=[2, 4],
        attn_ratio=2),
    'large': dict(
        cfgs=[[[3, 3, 32, 1], [3, 4, 64, 2], [3, 4, 64, 1]],
              [[5, 4, 128, 2], [5, 4, 128, 1]],
              [[3, 4, 192, 2], [3, 4, 192, 1]], [[5, 4, 256, 2]],
              [[3, 6, 320, 2]]],
        channels=[32, 64, 128, 192, 256, 320], emb_dims=[192, 256, 320],
        key_dims=[16, 20, 24], depths=[3, 3, 3], num_heads=8,
        mlp_ratios=[2, 4, 6], attn_ratio=2),
}
