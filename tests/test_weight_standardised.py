"""Weight-standardised convs (mmcv's ConvWS2d / ConvAWS2d, timm's
StdConv2d / ScaledStdConv2d): scored from their real gate gradient and
pruned exactly, inputs included (see cpd_mm/comb/handlers/std_conv.py)."""
import copy
import sys
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn

from cpd_mm.comb import ChannelGates, comb_model, generic_copy, prune_model
from cpd_mm.prune.importance import ImportanceAccumulator

sys.path.insert(0, osp.dirname(__file__))
from equivalence import assert_equivalent, random_kept  # noqa: E402

pytest.importorskip('mmpretrain')
from mmpretrain.models import MobileNetV2, ResNet, ResNeXt  # noqa: E402

GN = dict(type='GN', num_groups=8)


def _is_pruned_std(m):
    """A standardised conv that lost input channels (by name: the test
    also runs against code without it)."""
    return type(m).__name__ == 'PrunedStdConv2d'


class Classifier(nn.Module):
    """A backbone and a linear head: the loss reaches every stage."""

    def __init__(self, backbone, width):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.backbone(x)[-1].mean((2, 3)))


def _resnet(conv, norm=GN):
    torch.manual_seed(0)
    model = ResNet(depth=18, conv_cfg=dict(type=conv), norm_cfg=norm)
    for m in model.modules():
        if hasattr(m, 'weight_beta'):
            # ConvAWS2d's per-filter affine is a pair of buffers (1 and 0
            # at init, statistics of the checkpoint when loaded); generic
            # weights leave buffers alone: draw them here, or a lost shift
            # would pass
            m.weight_gamma.uniform_(0.5, 1.5)
            m.weight_beta.uniform_(-0.5, 0.5)
    return model


def _ws_convs(model):
    return [n for n, m in model.named_modules()
            if type(m).__name__ in ('ConvWS2d', 'ConvAWS2d', 'StdConv2d',
                                    'ScaledStdConv2d')]


def _timm_nf_resnet():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    return timm.create_model('nf_resnet26', num_classes=10)


def _explicit_and_scored(model, x, kind):
    """Explicit (dL/dm)² (or |dL/dm|) from a gate tensor, and what the
    scorer accumulates in one backward, in train mode, on generic weights
    (nf_resnet's skip-init gains of 0 silence its residual branches)."""
    comb = comb_model(model, example_inputs=x[:1], verify=False)
    model = generic_copy(model, 0)
    model.train()
    gates = ChannelGates(model, comb)
    scorer = ImportanceAccumulator(model, comb, kind)
    torch.manual_seed(1)
    model(x).logsumexp(1).sum().backward()
    scorer.step()
    leaf = torch.ones(comb.num_channels + 1, requires_grad=True)
    with gates.probing(leaf):
        torch.manual_seed(1)
        loss = model(x).logsumexp(1).sum()
    g = torch.autograd.grad(loss, leaf)[0][:-1].double().numpy()
    scorer.remove()
    gates.remove()
    explicit = g * g if kind == 'hessian' else np.abs(g)
    return comb, explicit, scorer.current()


@pytest.mark.parametrize('kind', ['hessian', 'taylor'])
@pytest.mark.parametrize('build', [
    pytest.param(lambda: Classifier(_resnet('ConvWS'), 512), id='ConvWS+GN'),
    pytest.param(lambda: Classifier(_resnet('ConvAWS'), 512),
                 id='ConvAWS+GN'),
    pytest.param(_timm_nf_resnet, id='timm-nf_resnet26')])
def test_score_is_the_real_gate_gradient(build, kind):
    """The gate on a weight-standardised conv's output (GroupNorm comes
    after it, so that gate stays) is scored from the activation: the score
    equals the explicit gate gradient. Scored from the weight
    (Σ w·∂L/∂w = 0 for a standardised weight) it would be 0."""
    model = build()
    ws = _ws_convs(model)
    assert ws
    comb, explicit, scored = _explicit_and_scored(
        model, torch.randn(2, 3, 32, 32), kind)
    at_ws = np.zeros(comb.num_channels, dtype=bool)
    for s in comb.sites:
        if s.module in ws:
            c = comb.channels(s.ids).ravel()
            at_ws[c[c >= 0]] = True
    assert at_ws.sum() > 100, 'no gate on a standardised conv: vacuous'
    free = ~comb.frozen_channels
    # (a channel that a ReLU zeroes on the whole small batch has none)
    assert (explicit[at_ws & free] > 0).sum() > 100
    err = np.abs(scored - explicit)[free] / explicit[free].max()
    assert err.max() < 1e-4, err.max()


@pytest.mark.parametrize('build,min_pruned', [
    pytest.param(lambda: _resnet('ConvWS'), 15, id='resnet18-ConvWS+GN'),
    pytest.param(lambda: _resnet('ConvAWS', dict(type='BN')), 15,
                 id='resnet18-ConvAWS+BN'),
    pytest.param(lambda: ResNeXt(depth=50, groups=32, width_per_group=4,
                                 num_stages=2, out_indices=(1, ),
                                 strides=(1, 2), dilations=(1, 1),
                                 conv_cfg=dict(type='ConvWS'),
                                 norm_cfg=dict(type='GN', num_groups=32)),
                 15, id='resnext50-grouped-ConvWS'),
    pytest.param(lambda: MobileNetV2(widen_factor=0.5,
                                     conv_cfg=dict(type='ConvWS')),
                 30, id='mobilenetv2-depthwise-ConvWS'),
    pytest.param(_timm_nf_resnet, 20, id='timm-nf_resnet26')])
def test_gated_equals_pruned(build, min_pruned):
    """Input channels of standardised convs are removed (their filters'
    statistics kept by PrunedStdConv2d), output channels too; exact in
    float64 (float32 rounding grows through these random networks)."""
    model = build()
    comb, kept, pruned, diff = assert_equivalent(
        model, (2, 3, 32, 32), dtype=torch.float64, tol=1e-9)
    n = sum(_is_pruned_std(m) for m in pruned.modules())
    assert n >= min_pruned, n
    assert not any('standardised' in r or 'linear' in r
                   for r in comb.frozen_reasons()), comb.frozen_reasons()


def test_gated_equals_pruned_float32():
    assert_equivalent(_resnet('ConvWS'), (2, 3, 32, 32))


def test_kept_weights_train_alike():
    """In training, the kept entries of a pruned standardised conv get the
    gradients they get in the gated model (same statistics, same
    function)."""
    model = _resnet('ConvWS')
    model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    comb = comb_model(model, example_inputs=x[:1], verify=False)
    kept = random_kept(comb, 0.5, np.random.default_rng(0))
    model = generic_copy(model, 0)
    pruned = prune_model(copy.deepcopy(model), comb, kept)
    model.train()  # (mmpretrain's ResNet.train returns None)
    pruned.train()
    gates = ChannelGates(model, comb)
    gates.set_kept(kept)
    model(x)[-1].square().sum().backward()
    gates.remove()
    pruned(x)[-1].square().sum().backward()
    keep = comb.keep_fn(kept)
    checked = 0
    for name, rec in comb.records.items():
        small = pruned.get_submodule(name)
        if not _is_pruned_std(small):
            continue
        kin, kout = keep(rec.inputs), keep(rec.outputs)
        full = model.get_submodule(name).weight.grad[kout][:, kin]
        torch.testing.assert_close(small.weight.grad, full, rtol=1e-9,
                                   atol=1e-12)
        checked += 1
    assert checked >= 15


def test_pruned_conv_prunes_again():
    """A pruned model combs and prunes again: further removed inputs are
    merged into the kept statistics."""
    model = _resnet('ConvWS')
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    model.double().eval()
    comb = comb_model(model, example_inputs=x, verify=False)
    once = prune_model(copy.deepcopy(model), comb,
                       random_kept(comb, 0.3, np.random.default_rng(0)))
    assert any(_is_pruned_std(m) for m in once.modules())
    _, _, twice, _ = assert_equivalent(once, (2, 3, 32, 32),
                                       dtype=torch.float64, tol=1e-9)
    assert sum(p.numel() for p in twice.parameters()) < \
        sum(p.numel() for p in once.parameters())


def test_plan_rebuilds_the_pruned_model():
    """A pruned checkpoint loads into the model built from its config and
    pruned by its plan: the kept statistics are buffers of the state."""
    from cpd_mm.prune.plan import apply_plan, make_plan
    model = _resnet('ConvAWS')
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    comb = comb_model(model, example_inputs=x, verify=False)
    kept = random_kept(comb, 0.5, np.random.default_rng(0))
    small = prune_model(generic_copy(model, 0), comb, kept)
    rebuilt = apply_plan(_resnet('ConvAWS'), make_plan(comb, kept, model))
    rebuilt.load_state_dict(small.state_dict())
    rebuilt.eval()
    assert any(k.endswith('removed_m2') for k in small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[-1], small(x)[-1])


class NormalisedConv(nn.Conv2d):
    """A user's conv whose weight is normalised per filter (no handler)."""

    def forward(self, x):
        w = self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


def _freezes(model, x, name, words, prune=True):
    comb = comb_model(model, example_inputs=x, verify=False)
    rec = comb.records[name]
    for atoms in (rec.inputs, rec.outputs):
        assert comb.frozen_channels[comb.channels(atoms)].all()
    assert any(words in r for r in comb.frozen_reasons()), \
        comb.frozen_reasons()
    if prune:  # the rest of the model still prunes exactly around it
        assert_equivalent(model, tuple(x.shape), dtype=torch.float64,
                          tol=1e-9)


def _body(conv):
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), conv,
                         nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                         nn.Conv2d(16, 4, 1))


def test_conv_with_unknown_weight_transform_is_frozen():
    """Convs whose output is not linear in their weight and that no
    handler covers freeze their channels with the reason: a user's
    normalised conv, mmcv's SAConv2d (a ConvAWS2d with its own forward),
    and a conv whose weight is a torch parametrization."""
    from mmcv.ops import SAConv2d
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16, 16)
    _freezes(_body(NormalisedConv(16, 16, 3, padding=1)), x, '2',
             'NormalisedConv: output not linear')
    _freezes(_body(SAConv2d(16, 16, 3, padding=1)), x, '2',
             'SAConv2d: a weight-standardised conv')
    _freezes(_body(nn.utils.parametrizations.weight_norm(
        nn.Conv2d(16, 16, 3, padding=1))), x, '2', 'computed',
        prune=False)  # (generic weights cannot copy a parametrization)
    # a subclass that is linear (mmcv's wrapper) is not frozen
    from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
    comb = comb_model(_body(MMCVConv2d(16, 16, 3, padding=1)),
                      example_inputs=x, verify=False)
    assert comb.records['2'].linear and not comb.frozen_reasons().keys() - {
        'model output (in <model>)'}
