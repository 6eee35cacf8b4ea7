"""SeaFormer's light segmentation head (``LightHead``) for MMSegmentation.

The 1/8 detail feature is refined by one fusion block per context feature:
a 1x1 conv + BN of the running detail map times the hard sigmoid of a 1x1
conv + BN of the (coarser) context map, bilinearly upsampled. A depthwise 1x1
ConvModule (``linear_fuse``) and the usual dropout + ``conv_seg`` give logits
at 1/8 resolution. Parameter names follow the official checkpoints
(``fuse1.local_embedding.conv.weight``, ``linear_fuse.conv.weight``, ...).
"""
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.registry import MODELS
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import nn

from .seaformer import HardSigmoid


class FusionBlock(nn.Module):
    """``local_embedding(x_local) * up(hard_sigmoid(global_act(x_global)))``.

    Args:
        local_channels (int): Channels of the detail (higher-resolution) map.
        global_channels (int): Channels of the context map.
        embed_dim (int): Output channels.
        norm_cfg (dict): Norm layer of both 1x1 ConvModules.
    """

    def __init__(self, local_channels, global_channels, embed_dim, norm_cfg):
        super().__init__()
        self.local_embedding = ConvModule(
            local_channels, embed_dim, 1, norm_cfg=norm_cfg, act_cfg=None)
        self.global_act = ConvModule(
            global_channels, embed_dim, 1, norm_cfg=norm_cfg, act_cfg=None)
        self.act = HardSigmoid()

    def forward(self, x_local, x_global):
        local_feat = self.local_embedding(x_local)
        # The gate is computed at the coarse resolution, then upsampled.
        gate = F.interpolate(self.act(self.global_act(x_global)),
                             size=x_local.shape[2:], mode='bilinear',
                             align_corners=False)
        return local_feat * gate


@MODELS.register_module()
class LightHead(BaseDecodeHead):
    """SeaFormer decode head.

    Args:
        embed_dims (Sequence[int]): Output channels of the fusion blocks
            ``fuse1``..; one per context input (``len(in_channels) - 1``).
            The last one must equal ``channels``.
        is_dw (bool): Whether ``linear_fuse`` is depthwise (as in all
            published models). Default: True.
        **kwargs: ``BaseDecodeHead`` arguments; ``in_channels`` and
            ``in_index`` are lists whose first entry is the 1/8 detail map.
            ``input_transform`` is always 'multiple_select'.
    """

    def __init__(self, embed_dims, is_dw=True, **kwargs):
        if kwargs.pop('input_transform', 'multiple_select') != \
                'multiple_select':
            raise ValueError("LightHead needs input_transform="
                             "'multiple_select'")
        super().__init__(input_transform='multiple_select', **kwargs)
        embed_dims = list(embed_dims)
        if len(embed_dims) != len(self.in_channels) - 1:
            raise ValueError(
                f'`embed_dims` needs one entry per context input '
                f'({len(self.in_channels) - 1}), but got {embed_dims}')
        if embed_dims[-1] != self.channels:
            raise ValueError(
                f'the last of `embed_dims` ({embed_dims[-1]}) must equal '
                f'`channels` ({self.channels})')
        self.embed_dims = embed_dims
        for i, dim in enumerate(embed_dims):
            local_channels = self.in_channels[0] if i == 0 else \
                embed_dims[i - 1]
            self.add_module(
                f'fuse{i + 1}',
                FusionBlock(local_channels, self.in_channels[i + 1], dim,
                            self.norm_cfg))
        self.linear_fuse = ConvModule(
            self.channels, self.channels, 1,
            groups=self.channels if is_dw else 1,
            norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)

    def forward(self, inputs):
        feats = self._transform_inputs(inputs)
        x = feats[0]
        for i in range(len(self.embed_dims)):
            x = getattr(self, f'fuse{i + 1}')(x, feats[i + 1])
        return self.cls_seg(self.linear_fuse(x))
