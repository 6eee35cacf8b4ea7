"""Mutation tests: break a rule on purpose and show that comb's
verification (freezes the broken groups, with the reason) and the
equivalence helper (raises) catch it, on real models. A check that still
passes with a broken rule is not a check.

Each mutation is one wrong rule someone could plausibly write:

- ``drop_residual_coupling``: an add no longer couples its operands' channels
  (the residual stream falls apart into per-block groups);
- ``misplaced_chunk_offsets``: the first half of a chunk reads its positions
  in reverse (an offset error: shapes stay right, values go to the wrong
  consumers). Swapping the two halves outright changes nothing, since
  position j of both halves is one channel (comb ties them);
- ``misread_head_reshape``: splitting a fused projection into heads reads
  the head dims in reverse (an error in the layout of a head reshape). On
  mmpretrain's DeiT as built, the zero-initialised head hides it from a
  check on the model's own weights;
- ``mirrored_branch_input``: surgery keeps the input columns of the last
  conv of a residual branch in mirrored order. In a ResNet built with
  ``zero_init_residual`` that conv feeds a BN with gamma = 0, so on the
  model's own weights the branch is silent and every check passes: the
  old verification (``weights='own'``) does not see it, generic weights do.
"""
import copy

import numpy as np
import pytest
import torch
import torchvision

from cpd_mm.comb import comb_model
from cpd_mm.comb.handlers.conv import ConvHandler
from cpd_mm.comb.rules import views
from cpd_mm.comb.rules.table import RULES
from cpd_mm.comb.space import TensorInfo, channel_axis
from cpd_mm.comb.verify import FAILED, verify_comb
from equivalence import assert_equivalent


def _wrap_rules(monkeypatch, names, wrap):
    for n in names:
        monkeypatch.setitem(RULES, n, wrap(RULES[n]))


def drop_residual_coupling(monkeypatch, where=''):
    """Adds inside modules whose name starts with ``where`` (one stage
    keeps the test fast) no longer couple their operands."""
    def wrap(rule):
        def broken(tr, args, kwargs, out):
            if not (tr.current_module or '').startswith(where):
                return rule(tr, args, kwargs, out)
            real = tr.uf.union
            tr.uf.union = lambda *a: None  # operands stay separate
            try:
                return rule(tr, args, kwargs, out)
            finally:
                tr.uf.union = real
        return broken
    _wrap_rules(monkeypatch, ('add', 'add_'), wrap)


def misplaced_chunk_offsets(monkeypatch):
    def wrap(rule):
        def broken(tr, args, kwargs, out):
            res = rule(tr, args, kwargs, out)
            first = res[0]
            ch = channel_axis(tr.uf.find(first.ids))
            if len(res) == 2 and ch is not None:
                res[0] = TensorInfo(np.flip(first.ids, ch).copy(), first.z,
                                    first.src, first.lin)
            return res
        return broken
    _wrap_rules(monkeypatch, ('split', 'chunk', 'split_with_sizes'), wrap)


def misread_head_reshape(monkeypatch):
    def wrap(rule):
        def broken(tr, args, kwargs, out):
            res = rule(tr, args, kwargs, out)
            x = args[0]
            splits_last = out.dim() > x.dim() and \
                out.shape[-1] < x.shape[-1] and res.has_ids
            if splits_last:  # (..., C) -> (..., heads, head_dim)
                return TensorInfo(np.flip(res.ids, -1).copy(), res.z,
                                  res.src, res.lin)
            return res
        return broken
    _wrap_rules(monkeypatch, tuple(views.VIEW_OPS), wrap)


def mirrored_branch_input(monkeypatch, model, last_conv):
    """Surgery keeps the input columns of the conv ``last_conv`` (the last
    of a residual branch) mirrored."""
    model.get_submodule(last_conv)._mutated = True
    real = ConvHandler.prune

    def broken(self, m, rec, keep):
        if not getattr(m, '_mutated', False):
            return real(self, m, rec, keep)
        return real(self, m, rec, lambda atoms: (
            keep(atoms)[::-1] if atoms is rec.inputs else keep(atoms)))
    monkeypatch.setattr(ConvHandler, 'prune', broken)


def verify(model, shape, weights='generic'):
    comb = comb_model(model, input_shape=shape, verify=False)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return verify_comb(model, comb, x, weights=weights)


def assert_caught(model, shape, report):
    """Verification froze groups as failed exactness checks, and the
    equivalence helper raises."""
    assert report.frozen, 'verification did not catch the broken rule'
    assert all(r.startswith(FAILED) for r in report.frozen.values())
    with pytest.raises((AssertionError, RuntimeError)):
        assert_equivalent(model, shape, 0.5)


def _deit():
    from test_comb_openmmlab import build, upstream_config
    cfg = upstream_config('mmpretrain::deit/deit-small_4xb256_in1k.py')
    # the DeiT class as users build it, two blocks deep for speed
    cfg.model.backbone.arch = dict(embed_dims=96, num_layers=2, num_heads=3,
                                   feedforward_channels=192)
    cfg.model.head.in_channels = 96
    return build(cfg).eval()


@pytest.fixture(scope='module')
def rules_unbroken():
    """Each real model of this file passes both checks when no rule is
    broken: what breaks below is the mutation."""
    for model, shape in ((_resnet(), (1, 3, 32, 32)),
                         (torchvision.models.shufflenet_v2_x0_5().eval(),
                          (1, 3, 32, 32)), (_deit(), (1, 3, 32, 32))):
        assert verify(model, shape).frozen == {}
        assert_equivalent(model, shape, 0.5)
    return True


def _resnet():
    return torchvision.models.resnet18(zero_init_residual=True).eval()


def test_dropped_residual_coupling_is_caught(monkeypatch, rules_unbroken):
    drop_residual_coupling(monkeypatch, where='layer1.')
    model = _resnet()
    assert_caught(model, (1, 3, 32, 32), verify(model, (1, 3, 32, 32)))


def test_misplaced_chunk_offsets_are_caught(monkeypatch, rules_unbroken):
    misplaced_chunk_offsets(monkeypatch)
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    assert_caught(model, (1, 3, 32, 32), verify(model, (1, 3, 32, 32)))


def test_misread_head_reshape_is_caught(monkeypatch, rules_unbroken):
    """mmpretrain's DeiT as built: its head is zero-initialised, so on the
    model's own weights every output is the head's bias and no check can
    see anything (the old verification special-cased constant outputs by
    re-drawing all-zero weight tensors); generic weights need no special
    case."""
    misread_head_reshape(monkeypatch)
    model = _deit()
    assert verify(model, (1, 3, 32, 32), weights='own').frozen == {}
    assert_caught(model, (1, 3, 32, 32), verify(model, (1, 3, 32, 32)))


def test_broken_rule_in_a_silent_branch_is_caught(monkeypatch,
                                                  rules_unbroken):
    """The issue's case: gamma = 0 (``zero_init_residual``) hides a wrong
    rule inside the residual branch from a check on the model's own
    weights; the same check sees it once gamma is not 0, and generic
    weights see it at gamma = 0."""
    model = _resnet()
    mirrored_branch_input(monkeypatch, model, 'layer2.1.conv2')
    shape = (1, 3, 32, 32)
    assert verify(model, shape, weights='own').frozen == {}
    trained = copy.deepcopy(model)
    torch.nn.init.uniform_(trained.layer2[1].bn2.weight, 0.5, 1.5)
    assert verify(trained, shape, weights='own').frozen
    assert_caught(model, shape, verify(model, shape))
