"""Equivalence invariant on torchvision models and hand-built attention."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cpd_mm.comb import comb_model
from equivalence import assert_equivalent


@pytest.mark.parametrize('name,ratio,leave_one', [
    ('resnet50', 0.5, False),
    ('resnet50', 0.7, False),
    ('mobilenet_v3_small', 0.5, False),
    ('densenet121', 0.5, False),
    ('shufflenet_v2_x0_5', 0.5, False),
    ('shufflenet_v2_x0_5', 0.0, True),
    ('resnext50_32x4d', 0.5, False),
    ('mobilenet_v2', 0.0, True),
])
def test_torchvision_equivalence(name, ratio, leave_one):
    model = getattr(torchvision.models, name)(num_classes=10)
    comb, kept, pruned, diff = assert_equivalent(
        model, (1, 3, 64, 64), ratio=ratio, leave_one=leave_one)
    # the classifier's output layer is never pruned
    assert pruned(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_resnext_groups_are_uniform():
    model = torchvision.models.resnext50_32x4d()
    comb = comb_model(model, input_shape=(1, 3, 64, 64))
    g = comb.group('layer1.0.conv1')
    assert g.granularity == 'uniform over 32 conv groups/heads'
    assert g.size == 128 // 32  # one channel = same position in 32 groups


def test_shufflenet_split_pairs_halves():
    model = torchvision.models.shufflenet_v2_x0_5()
    comb = comb_model(model, input_shape=(1, 3, 64, 64))
    # chunk(2) + channel shuffle: both halves lose the same positions
    assert len(comb.prunable_groups) >= 10


def test_resnet50_half_channels_halves_flops():
    from cpd_mm.prune import CostModel
    model = torchvision.models.resnet50()
    comb = comb_model(model, input_shape=(1, 3, 64, 64))
    kept = np.ones(comb.num_channels, bool)
    for g in comb.prunable_groups:
        free = np.nonzero(~g.frozen)[0]
        kept[g.channels[free[:len(free) // 2]]] = False
    cost = CostModel(model, comb)
    ratio = cost.flops(kept) / cost.total_flops
    # every inner conv loses half its inputs and outputs: ~1/4 of its FLOPs
    assert 0.2 < ratio < 0.35, ratio


class Attention(nn.Module):

    def __init__(self, dim, heads, fused):
        super().__init__()
        self.num_heads, self.head_dims, self.embed_dims = heads, dim // heads, dim
        self.scale = self.head_dims ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.fused = fused

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dims)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.embed_dims))


class TinyViT(nn.Module):

    def __init__(self, dim=48, heads=3, depth=2, fused=True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(dim), attn=Attention(dim, heads, fused),
                ln2=nn.LayerNorm(dim), fc1=nn.Linear(dim, dim * 4),
                act=nn.GELU(), fc2=nn.Linear(dim * 4, dim))))
        self.gamma = nn.Parameter(torch.rand(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = x + self.pos_embed
        for b in self.blocks:
            x = x + b['attn'](b['ln1'](x))
            x = x + self.gamma * b['fc2'](b['act'](b['fc1'](b['ln2'](x))))
        return self.head(self.norm(x)[:, 0])


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('ratio,leave_one', [(0.5, False), (0.7, False),
                                             (0.0, True)])
def test_vit_attention_equivalence(fused, ratio, leave_one):
    model = TinyViT(fused=fused)
    comb, kept, pruned, _ = assert_equivalent(
        model, (1, 3, 32, 32), ratio=ratio, leave_one=leave_one)
    g = comb.group('blocks.0.attn.qkv')
    assert g.size == 16  # one channel per head dim, uniform over heads
    new = int(kept[g.channels].sum())
    assert pruned.blocks[0]['attn'].head_dims == new
    assert pruned.blocks[0]['attn'].num_heads == 3
    stream = comb.group('patch')
    assert {'cls_token', 'pos_embed', 'gamma'} <= set(stream.passengers)


@pytest.mark.parametrize('ratio,leave_one', [(0.5, False), (0.0, True)])
def test_multihead_attention_is_pruned_exactly(ratio, leave_one):
    from torchvision.models.vision_transformer import VisionTransformer
    from cpd_mm.comb import PrunedMultiheadAttention
    from cpd_mm.prune import apply_plan, make_plan
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                              num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 32, 32), ratio,
                                              leave_one=leave_one)
    attn = pruned.encoder.layers[0].self_attention
    assert isinstance(attn, PrunedMultiheadAttention)
    assert attn.num_heads == 4
    # the residual stream (conv_proj, class token, pos embedding, out_proj
    # of every block) is one prunable group
    stream = comb.group('conv_proj')
    assert stream.prunable and 'class_token' in stream.passengers
    # a plan rebuilds the same structure on a fresh model; weights load
    fresh = VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                              num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=5)
    apply_plan(fresh, make_plan(comb, kept, model))
    fresh.load_state_dict(pruned.state_dict())


class _KVAttention(nn.Module):
    """q = k = f(x), v = x (same channels, different tensors), and an
    attention with an out_proj bias but no in_proj bias (as TNT has)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.attn2 = nn.MultiheadAttention(16, 2)
        self.attn2.register_parameter('in_proj_bias', None)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        t = self.fc(x.flatten(2).transpose(1, 2))
        q = torch.relu(t) * 2
        t = t + self.attn(q, q, t)[0]
        s = t.transpose(0, 1)
        t = t + self.attn2(s, s, s)[0].transpose(0, 1)
        return self.head(t.mean(1))


@pytest.mark.parametrize('leave_one', [False, True])
def test_multihead_attention_value_tensor_and_biases(leave_one):
    torch.manual_seed(0)
    comb, kept, pruned, _ = assert_equivalent(
        _KVAttention(), (2, 8, 5, 1), 0.5, leave_one=leave_one,
        dtype=torch.float64, tol=1e-10)
    assert len(comb.prunable_groups) == 3  # stream, and each attention
    assert pruned.attn2.in_proj_bias is None
    assert pruned.attn2.out_proj.bias is not None
