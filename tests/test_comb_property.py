"""Property test: random small networks, random plans, gated == pruned.

Run in float64 with a 1e-10 tolerance: the equivalence is exact, and float64
keeps float32 rounding (which e.g. a GroupNorm left with one channel per
group amplifies to ~1e-5 on some random networks) out of the verdict. The
named architectures are checked in float32 at 1e-5 elsewhere.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from equivalence import assert_equivalent

BLOCKS = ['conv', 'grouped', 'depthwise', 'residual', 'concat', 'split',
          'gn', 'se', 'linear_ln', 'attention']


class Block(nn.Module):
    """One randomly chosen block; keeps the channel count ``c``."""

    def __init__(self, kind, c):
        super().__init__()
        self.kind = kind
        if kind == 'conv':
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
        elif kind == 'grouped':
            self.conv = nn.Conv2d(c, c, 3, padding=1, groups=4, bias=False)
            self.bn = nn.BatchNorm2d(c)
        elif kind == 'depthwise':
            self.conv = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c)
            self.pw = nn.Conv2d(2 * c, c, 1)
        elif kind == 'residual':
            self.a = nn.Conv2d(c, c // 2, 1)
            self.b = nn.Conv2d(c // 2, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)
        elif kind == 'concat':
            self.a = nn.Conv2d(c, c // 2, 1)
            self.b = nn.Conv2d(c, c // 2, 3, padding=1)
            self.fuse = nn.Conv2d(c, c, 1)
        elif kind == 'split':
            self.a = nn.Conv2d(c // 2, c // 2, 1)
            self.merge = nn.Conv2d(c, c, 1)
        elif kind == 'gn':
            self.conv = nn.Conv2d(c, c, 1)
            self.gn = nn.GroupNorm(4, c)
        elif kind == 'se':
            self.conv = nn.Conv2d(c, c, 1)
            self.fc1 = nn.Conv2d(c, c // 4, 1)
            self.fc2 = nn.Conv2d(c // 4, c, 1)
        elif kind == 'linear_ln':
            self.fc = nn.Linear(c, c)
            self.ln = nn.LayerNorm(c)
        elif kind == 'attention':
            self.heads = 2
            self.qkv = nn.Linear(c, 3 * c)
            self.proj = nn.Linear(c, c)
            self.ln = nn.LayerNorm(c)

    def forward(self, x):
        k = self.kind
        if k in ('conv', 'grouped'):
            return F.relu(self.bn(self.conv(x)))
        if k == 'depthwise':
            return self.pw(F.relu(self.conv(x)))
        if k == 'residual':
            return F.relu(x + self.bn(self.b(F.relu(self.a(x)))))
        if k == 'concat':
            return self.fuse(torch.cat([self.a(x), self.b(x)], 1))
        if k == 'split':
            x1, x2 = x.chunk(2, dim=1)
            return self.merge(torch.cat([x1, F.relu(self.a(x2))], 1))
        if k == 'gn':
            return F.relu(self.gn(self.conv(x)))
        if k == 'se':
            y = self.conv(x)
            s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3),
                                                             keepdim=True)))))
            return y * s
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        if k == 'linear_ln':
            t = t + self.ln(self.fc(t))
        else:
            q, kk, v = self.qkv(self.ln(t)).reshape(
                B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, kk, v)
            t = t + self.proj(a.transpose(1, 2).reshape(B, H * W, -1))
        return t.transpose(1, 2).reshape(B, C, H, W)


class RandomNet(nn.Module):

    def __init__(self, kinds, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(k, c) for k in kinds])
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5),
       ratio=st.sampled_from([0.25, 0.5, 0.7]),
       leave_one=st.booleans(), seed=st.integers(0, 1000))
def test_random_networks_gated_equals_pruned(kinds, ratio, leave_one, seed):
    torch.manual_seed(seed)
    model = RandomNet(kinds)  # checked on generic weights and statistics
    assert_equivalent(model, (1, 3, 8, 8), ratio=ratio, seed=seed,
                      leave_one=leave_one, dtype=torch.float64, tol=1e-10)
