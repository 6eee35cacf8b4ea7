"""Minimal repros of the constructs that break pruning in the zoo.

Each repro wraps the *real* MMPretrain / MMSegmentation / torchvision
module that breaks (between a producing conv/linear and a consuming one so
that its channels are prunable) and runs the zoo's check on it: comb,
random 50% plan, gate, prune, compare (float64, 1e-6).

    python benchmarks/zoo_repros.py            # all, one line each
    python benchmarks/zoo_repros.py convnext_ln res2net

The zoo model each repro stands for is in its docstring; the construct and
diagnosis are in docs/zoo_coverage.md ("Failure survey").
"""
import sys

import torch
import torch.nn as nn

from zoo_check import prune_check

REPROS = {}
FLOAT32 = {'mha_value_differs'}  # float64 hides it behind mha_float64


def repro(fn):
    REPROS[fn.__name__] = fn
    return fn


class Between(nn.Module):
    """``conv(C_in -> C) -> body -> conv(C -> 8)`` on NCHW (or a linear pair
    on tokens when ``tokens``), so the body's channels can be pruned.
    ``c_in=None``: no first conv (the body takes the image)."""

    def __init__(self, body, c, c_in=3, tokens=False, body_call=None):
        super().__init__()
        lin = nn.Linear if tokens else (lambda i, o: nn.Conv2d(i, o, 1))
        self.pre = lin(c_in, c) if c_in else nn.Identity()
        self.body, self.body_call = body, body_call
        self.post = lin(c, 8)

    def forward(self, x):
        x = self.pre(x)
        x = self.body_call(self.body, x) if self.body_call else self.body(x)
        return self.post(x)


@repro
def convnext_ln():
    """mmpretrain/convnext, convnext_v2, mmseg/convnext: channel-first
    LayerNorm (mmpretrain LayerNorm2d normalises dim 1 of NCHW)."""
    from mmpretrain.models.utils import LayerNorm2d
    return Between(LayerNorm2d(16), 16), torch.randn(1, 3, 8, 8)


@repro
def res2net():
    """mmpretrain/res2net: split(out, self.width) -> per-branch conv, each
    branch added to the next chunk -> concat (multi-scale residual)."""
    from mmpretrain.models.backbones.res2net import Bottle2neck
    block = Bottle2neck(64, 64, scales=4, base_width=26, base_channels=64)
    return Between(block, 64), torch.randn(1, 3, 8, 8)


@repro
def csra_head():
    """mmpretrain/csra: the head divides by the norm of its own conv weight
    over the input channels (weight-normalised classifier)."""
    from mmpretrain.models.heads import CSRAClsHead
    head = CSRAClsHead(num_classes=5, in_channels=32, num_heads=1, lam=0.1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.head = nn.Conv2d(3, 32, 1), head

        def forward(self, x):
            return self.head((self.pre(x), ))
    return M(), torch.randn(1, 3, 8, 8)


def _davit():
    from mmpretrain.models.backbones import DaViT
    arch = dict(embed_dims=32, depths=[1, 1], num_heads=[1, 2])
    return DaViT(arch=arch, out_indices=(1, ), pad_small_map=True)


@repro
def davit_out_view():
    """mmpretrain/davit: the backbone reshapes its outputs with
    ``view(-1, *hw_shape, self.num_features[i])`` (a list attribute that
    surgery does not update)."""
    return (Between(_davit(), 64, c_in=None, body_call=lambda b, x: b(x)[0]),
            torch.randn(1, 3, 32, 32))


@repro
def davit_head_width_from_input():
    """mmpretrain/davit (latent: the random 50% plan hides it): window
    attention reshapes qkv to ``C // num_heads`` with C the *input* width,
    so head dims must shrink exactly like the residual stream. Here the
    stream is the model output (frozen) and head dims are pruned."""
    return _davit(), torch.randn(1, 3, 32, 32)


@repro
def swin_window_attn():
    """mmpretrain/swin_transformer, glip, simmim: SwinBlock (roll, window
    partition, relative position bias); WindowMSA reshapes qkv to
    ``C // num_heads`` with C the input width (mixed plan raises)."""
    from mmpretrain.models.backbones.swin_transformer import SwinBlock
    block = SwinBlock(32, num_heads=2, window_size=4, shift=True)
    return (Between(block, 32, c_in=8, tokens=True,
                    body_call=lambda b, x: b(x, (8, 8))),
            torch.randn(1, 64, 8))


@repro
def segnext_mscan():
    """mmseg/segnext: MSCAN attention module, x * attn(x) where attn sums
    depthwise convs with large strip kernels (1x7, 7x1, 1x11 ...)."""
    from mmseg.models.backbones.mscan import MSCASpatialAttention
    return Between(MSCASpatialAttention(16), 16), torch.randn(1, 3, 16, 16)


@repro
def poolformer_mixer():
    """mmpretrain/poolformer, mmseg/poolformer: token mixer pool(x) - x
    inside a block with GroupNorm(1, C) and layer scale."""
    from mmpretrain.models.backbones.poolformer import PoolFormerBlock
    return Between(PoolFormerBlock(16), 16), torch.randn(1, 3, 8, 8)


@repro
def tinyvit_split_attrs():
    """mmpretrain/tinyvit: LeAttention splits qkv per head with
    ``split([self.key_dim, self.key_dim, self.d], dim=3)``: split sizes
    read from attributes that surgery does not update."""
    from mmpretrain.models.utils.attention import LeAttention
    attn = LeAttention(32, key_dim=16, num_heads=2, attn_ratio=1,
                       resolution=(4, 4))
    return Between(attn, 32, c_in=8, tokens=True), torch.randn(1, 16, 8)


@repro
def tnt_mha_without_in_bias():
    """mmpretrain/tnt: nn.MultiheadAttention whose in_proj_bias was set to
    None after construction while out_proj keeps its bias (TNT's
    qkv_bias=False): surgery's replacement has no out_proj bias."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    attn = MultiheadAttention(32, 2, batch_first=True)
    attn.attn.in_proj_bias = None
    return Between(attn, 32, c_in=8, tokens=True), torch.randn(1, 16, 8)


@repro
def van_child_attr_view():
    """mmpretrain/van: the backbone reshapes each stage output with
    ``reshape(-1, *hw_shape, block.out_channels)``: an attribute of a child
    block, not of the module that reshapes."""
    from mmpretrain.models.backbones import VAN
    van = VAN(arch=dict(embed_dims=[16, 32], depths=[1, 1],
                        ffn_ratios=[2, 2]), out_indices=(1, ))
    return (Between(van, 32, c_in=None, body_call=lambda b, x: b(x)[0]),
            torch.randn(1, 3, 32, 32))


@repro
def twins_lsa_shared_attr():
    """mmpretrain/twins (mixed plan only): LocallyGroupedSelfAttention
    reshapes qkv to ``C // num_heads`` with C the input width (as Swin);
    in the full model GlobalSubsampledAttention's ``embed_dims`` would also
    need two sizes (residual and attention width) and surgery says so."""
    from mmpretrain.models.backbones.twins import LSAEncoderLayer
    layer = LSAEncoderLayer(32, 2, 64, window_size=4)
    return (Between(layer, 32, c_in=8, tokens=True,
                    body_call=lambda b, x: b(x, (8, 8))),
            torch.randn(1, 64, 8))


@repro
def mvit_decomposed_rel_pos():
    """mmpretrain/mvit (also ViTSAM): rel_pos_h[coords] (aten.index on a
    parameter, unhandled) then einsum with q over the head dim: the
    parameter's head-dim axis is not sliced."""
    from mmpretrain.models.backbones.mvit import MultiScaleAttention
    attn = MultiScaleAttention(32, 32, 2, rel_pos_spatial=True,
                               input_size=(4, 4))
    return (Between(attn, 32, c_in=8, tokens=True,
                    body_call=lambda b, x: b(x, (4, 4))[0]),
            torch.randn(1, 16, 8))


@repro
def mha_float64():
    """mmseg/dpt, mmseg/segmenter, mmseg/vit (float64 only): surgery swaps
    nn.MultiheadAttention for a pruned module built in the default dtype,
    so a float64 (or half) model gets float32 attention weights."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    attn = MultiheadAttention(32, 2, batch_first=True)
    return Between(attn, 32, c_in=8, tokens=True), torch.randn(1, 16, 8)


@repro
def xcit_class_attn():
    """mmpretrain/xcit: ClassAttntion reshapes q, k, v to
    ``C // num_heads`` with C the input width (like Swin's WindowMSA)."""
    from mmpretrain.models.backbones.xcit import ClassAttntion
    return Between(ClassAttntion(32, num_heads=2), 32, c_in=8, tokens=True), \
        torch.randn(1, 5, 8)


@repro
def nonlocal_inherited_forward():
    """mmseg/nonlocal_net: mmcv NonLocal2d reshapes with
    ``self.inter_channels`` in ``_NonLocalNd.forward`` (a base class):
    surgery reads only the subclass's source for shape attributes."""
    from mmcv.cnn import NonLocal2d
    return Between(NonLocal2d(16), 16), torch.randn(1, 3, 8, 8)


@repro
def gcnet_context_block():
    """mmseg/gcnet: mmcv ContextBlock's channel_add_conv uses
    ``nn.LayerNorm([planes, 1, 1])`` (normalises over C, H, W of NCHW)."""
    from mmcv.cnn.bricks import ContextBlock
    return Between(ContextBlock(16, 0.25), 16), torch.randn(1, 3, 8, 8)


@repro
def edgenext_sdta_chunks():
    """mmpretrain/edgenext (hidden behind its LayerNorm2d): SDTA splits x
    into chunks of ``self.conv_channels`` (the last one shorter), runs a
    depthwise conv per chunk, each added to the next chunk, then concat."""
    from mmpretrain.models.backbones.edgenext import SDTAEncoder
    block = SDTAEncoder(30, scales=4, num_heads=2, use_pos_emb=False)
    return Between(block, 30), torch.randn(1, 3, 8, 8)


@repro
def maxvit_local_var_attrs():
    """tv/maxvit: RelativePositionalMultiHeadAttention reads
    ``H, DH = self.n_heads, self.head_dim`` into locals and reshapes with
    them; surgery looks for ``.head_dim`` inside the reshape call only."""
    from torchvision.models.maxvit import \
        RelativePositionalMultiHeadAttention as Attn
    return (Between(Attn(32, 16, 16), 32, c_in=8, tokens=True),
            torch.randn(1, 2, 16, 8))


@repro
def mmseg_beit_attn():
    """mmseg/mae (mmseg's BEiT attention without q/v bias, as MAE builds
    it; mixed plan): the output is reshaped to the input width C
    (``reshape(B, N, C)``), tying the attention width to the residual
    stream."""
    from mmseg.models.backbones.beit import BEiTAttention
    attn = BEiTAttention(32, 2, window_size=(4, 4), bias=False)
    return Between(attn, 32, c_in=8, tokens=True), torch.randn(1, 17, 8)


@repro
def mha_value_differs():
    """mmseg/maskformer, mask2former (reached only with a data-sample
    forward): nn.MultiheadAttention called with a value tensor that is not
    the query (DETR-style decoders: q = k = x + pos, v = x; cross
    attention). Runs in float32 (see mha_float64)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.post = nn.Linear(8, 32), nn.Linear(32, 8)
            self.attn = nn.MultiheadAttention(32, 2, batch_first=True)

        def forward(self, x):
            x = self.pre(x)
            return self.post(self.attn(x, x, 2 * x)[0])
    return M(), torch.randn(1, 16, 8)


@repro
def apcnet_acm():
    """mmseg/apcnet (mixed plan): ACM contracts the ``gla`` conv's
    pool_scale**2 output channels against pooled spatial positions
    (matmul) and views pooled features with ``self.channels``."""
    from mmseg.models.decode_heads.apc_head import ACM
    acm = ACM(2, True, 16, 16, None, dict(type='BN'), dict(type='ReLU'))
    return Between(acm, 16), torch.randn(1, 3, 8, 8)


@repro
def prelu_per_channel():
    """mmseg/cgnet (exact, but 90% of channels frozen, 100% FLOPs kept):
    nn.PReLU(num_parameters=C) runs aten._prelu_kernel, which has no
    channel rule."""
    return Between(nn.PReLU(16), 16), torch.randn(1, 3, 8, 8)


def main(names):
    for name in names or REPROS:
        torch.manual_seed(0)
        model, x = REPROS[name]()
        dtype = torch.float32 if name in FLOAT32 else torch.float64
        model.to(dtype)
        model.eval()  # some backbones' train() returns None
        res = {}
        prune_check(model, x.to(dtype), res)
        err = res.get('error', '')
        detail = f'max rel diff {res["max_rel_diff"]:.2e}' \
            if res.get('max_rel_diff') is not None else err
        extra = res.get('first_divergence') or res.get('cpd_where') or ''
        mixed = res.get('mixed', {})
        mixed = mixed.get('status', '') + ' ' + (
            mixed.get('error') or mixed.get('first_divergence') or '')
        frozen = '; '.join(r for r in res.get('frozen_reasons', {})
                           if not r.startswith('model output'))
        print(f'{name:28s} {res["status"]:10s} {detail} {extra}\n'
              f'{"":28s} mixed plan: {mixed}\n'
              f'{"":28s} frozen: {frozen[:150] or "-"}', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
