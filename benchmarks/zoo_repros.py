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


def main(names):
    import numpy  # noqa: F401
    for name in names or REPROS:
        model, x = REPROS[name]()
        torch.manual_seed(0)
        model.double()
        model.eval()  # some backbones' train() returns None
        res = {}
        prune_check(model, x.double(), res)
        err = res.get('error', '')
        detail = f'max rel diff {res["max_rel_diff"]:.2e}' \
            if res.get('max_rel_diff') is not None else err
        extra = res.get('first_divergence') or res.get('cpd_where') or ''
        print(f'{name:18s} {res["status"]:10s} {detail} {extra}', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
