"""Comb verifies its own groups: what a rule gets wrong is frozen, with the
reason, and found by bisection at a logarithmic cost."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from cpd_mm.comb import comb_model
from cpd_mm.comb.verify import FAILED
from equivalence import assert_equivalent


class HardCodedReshape(nn.Module):
    """A reshape with a literal channel count: no rule can update it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        B = y.shape[0]
        y = y.reshape(B, 16, -1).mean(-1)  # the literal 16 breaks pruning
        return self.head(y)


def test_a_hard_coded_reshape_is_frozen_with_the_error():
    model = HardCodedReshape()
    raw = comb_model(model, input_shape=(1, 3, 8, 8), verify=False)
    assert raw.group('b').prunable  # the rules alone would prune it
    comb = comb_model(model, input_shape=(1, 3, 8, 8))
    g = comb.group('b')
    assert not g.prunable and g.frozen.all()
    reason = comb.verification.frozen['b']
    assert reason.startswith(FAILED) and 'pruned model raised' in reason
    assert any(r.startswith(FAILED) for r in g.reasons)
    # the other group was checked and stays prunable
    assert comb.group('a').prunable and 'a' not in comb.verification.frozen


class ShapeScaled(nn.Module):
    """Scales by 1/sqrt(its channel count), read from the tensor's shape in
    Python: no rule sees the count, so pruning changes the function."""

    def forward(self, x):
        return x * x.shape[1] ** -0.5


def _shape_scaled_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), ShapeScaled(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def test_a_silent_difference_is_frozen():
    """A scale computed from the channel count in Python: removing channels
    changes every output (no error, a different function) and no rule can
    see it; verification finds the group whose width it reads, and only
    that one."""
    model = _shape_scaled_net()
    comb = comb_model(model, input_shape=(1, 3, 8, 8))
    frozen = comb.verification.frozen
    assert list(frozen) == ['2'], frozen
    assert 'max relative difference' in frozen['2']
    assert comb.group('0').prunable and comb.group('4').prunable
    # what is left prunes exactly
    assert_equivalent_after(model, comb)


def assert_equivalent_after(model, comb):
    from cpd_mm.comb import ChannelGates, prune_model
    from cpd_mm.comb.verify import random_plans
    x = torch.randn(1, 3, 8, 8)
    for kept in random_plans(comb, seed=7):
        gates = ChannelGates(model, comb)
        gates.set_kept(kept)
        with torch.no_grad():
            a = model(x)
        gates.remove()
        b = prune_model(copy.deepcopy(model), comb, kept)(x)
        with torch.no_grad():
            d = (a - b).abs().max() / a.abs().max()
        assert float(d) < 1e-5


class ManyGroups(nn.Module):
    """``n`` independent branches; the ones in ``bad`` have a literal
    reshape."""

    def __init__(self, n=16, bad=(5, )):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(3, 8, 1) for _ in range(n))
        self.outs = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in range(n))
        self.bad = set(bad)

    def forward(self, x):
        ys = []
        for i, (a, b) in enumerate(zip(self.branches, self.outs)):
            y = torch.relu(a(x))
            if i in self.bad:  # channel attention with a literal width
                s = y.reshape(y.shape[0], 8, -1).mean(-1)
                y = y * s.view(y.shape[0], -1, 1, 1)
            ys.append(b(y))
        return torch.cat(ys, 1)


@pytest.mark.parametrize('G,bad', [(16, (5, )), (64, (0, 29, 63))])
def test_bisection_cost_is_logarithmic(G, bad):
    model = ManyGroups(G, bad)
    comb = comb_model(model, input_shape=(1, 3, 4, 4))
    v = comb.verification
    assert sorted(v.frozen) == sorted(f'branches.{i}' for i in bad)
    k = len(bad)
    # one check per plan, then per bad group one check per halving and
    # one re-check of what is left
    assert v.checks <= 2 + k * (math.ceil(math.log2(G)) + 1), v.checks
    assert v.checks < G / 2  # far fewer than one check per group


def test_verification_leaves_the_model_alone():
    model = HardCodedReshape().train()
    before = copy.deepcopy(model.state_dict())
    comb_model(model, input_shape=(1, 3, 8, 8))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(getattr(m, '_forward_hooks', None) for m in
                   model.modules())


def test_verification_passes_exact_models_untouched():
    """On a model the rules handle, verification freezes nothing and the
    groups equal those of the unverified comb."""
    import torchvision
    model = torchvision.models.resnet18()
    raw = comb_model(model, input_shape=(1, 3, 32, 32), verify=False)
    comb = comb_model(model, input_shape=(1, 3, 32, 32))
    assert comb.verification.frozen == {}
    assert np.array_equal(raw.frozen_channels, comb.frozen_channels)
    assert comb.verification.checks == 2


# ------------------------------------------------------- generic weights
def test_generic_copy_leaves_no_branch_silent():
    """A ResNet with zero_init_residual (gamma = 0 at the end of every
    branch) and a zero-initialised head: the copy has generic values
    everywhere, the model is untouched, and the caller's RNG too."""
    import torchvision
    from cpd_mm.comb import generic_copy
    model = torchvision.models.resnet18(zero_init_residual=True,
                                        num_classes=4).eval()
    nn.init.zeros_(model.fc.weight)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    a, b = generic_copy(model), generic_copy(model)
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model is not modified
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])  # seeded
    bn = a.layer1[0].bn2
    assert float(bn.weight.min()) >= 0.5 and float(bn.weight.max()) <= 1.5
    assert bool((bn.bias != 0).all()) and bool((bn.running_mean != 0).all())
    assert float(bn.running_var.min()) >= 0.5
    assert int(bn.num_batches_tracked) == int(
        model.layer1[0].bn2.num_batches_tracked)
    assert float(a.fc.weight.abs().min()) > 0 and not a.training
    conv = a.layer3[0].conv1.weight  # fan-in scaled
    assert abs(float(conv.std()) * math.sqrt(conv[0].numel()) - 1) < 0.1
    # the branch now reaches the output
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = a(x)
        a.layer1[0].bn2.weight.mul_(2)
        assert not torch.allclose(a(x), y)
    assert generic_copy(model.double()).fc.weight.dtype == torch.float64


class Noisy(nn.Module):
    """Eight independent convs whose outputs get NumPy noise in eval mode
    (a random gain):
    the forward is not deterministic, whatever comb seeds."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 1) for _ in range(8))
        self.out = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        y = torch.cat([c(x) for c in self.convs], 1)
        return self.out(torch.relu(y) * (1 + 0.1 * np.random.rand()))


def test_a_nondeterministic_forward_is_reported_not_blamed_on_groups():
    comb = comb_model(Noisy(), input_shape=(1, 3, 4, 4))
    v = comb.verification
    assert 'not deterministic' in v.nondeterministic
    assert len(v.frozen) == 8 and not comb.prunable_groups
    for reason in v.frozen.values():
        assert not reason.startswith(FAILED)
        assert 'not deterministic' in reason and 'eval mode' in reason
    # one failed plan (plus its float64 re-check when the noise happens to
    # be below 1e-2), then two plain runs: no bisection over the 8 groups
    assert v.checks <= 2
    assert 'not run' in str(v)


def test_torch_randomness_in_eval_is_replayed():
    """Noise drawn with torch (SegNeXt's Hamburger draws its NMF bases in
    eval mode) is the same in every run: the model is verified."""
    class TorchNoise(Noisy):
        def forward(self, x):
            y = torch.cat([c(x) for c in self.convs], 1)
            return self.out(torch.relu(y) * (1 + 0.1 * torch.rand(())))

    comb = comb_model(TorchNoise(), input_shape=(1, 3, 4, 4))
    assert comb.verification.nondeterministic == ''
    assert comb.verification.frozen == {} and len(comb.prunable_groups) == 8


def test_plans_remove_every_free_channel():
    """The two plans are complementary: each group keeps one channel in one
    plan and a share in the other, and what it keeps alone is removed in
    the other plan."""
    import torchvision
    from cpd_mm.comb.verify import random_plans
    comb = comb_model(torchvision.models.resnet18(),
                      input_shape=(1, 3, 32, 32), verify=False)
    a, b = random_plans(comb, seed=3)
    for g in comb.prunable_groups:
        ka, kb = a[g.channels], b[g.channels]
        assert sorted([int(ka.sum()), int(kb.sum())])[0] == 1, g.name
        assert not (ka & kb).any(), g.name  # every channel removed once


def test_check_pruning_counts_flops_where_mmengine_cannot(repo_root):
    """tools/check_pruning.py reports FLOPs for every model: mmengine's
    counter where it runs, cpd_mm's cost model where it fails (it calls
    ``model(x)``; a detector's heads need more), and says which."""
    import importlib.util
    import os.path as osp
    from cpd_mm.comb import prune_model
    from cpd_mm.comb.verify import random_plans
    from cpd_mm.prune import CostModel
    spec = importlib.util.spec_from_file_location(
        '_check_pruning', osp.join(repo_root, 'tools', 'check_pruning.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    class NeedsSamples(nn.Sequential):
        def forward(self, x, samples=None):
            if samples is None:
                raise TypeError('needs data samples')
            return super().forward(x)

    x = torch.randn(1, 3, 8, 8)
    for model, counter in ((nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(),
                                          nn.Conv2d(8, 4, 3)), 'mmengine'),
                           (NeedsSamples(nn.Conv2d(3, 8, 3), nn.ReLU(),
                                         nn.Conv2d(8, 4, 3)), 'cpd_mm')):
        comb = comb_model(model, example_inputs=x, verify=False,
                          forward=lambda m, t: m(t, samples=[])
                          if isinstance(m, NeedsSamples) else m(t))
        kept = random_plans(comb)[0]
        pruned = prune_model(copy.deepcopy(model), comb, kept)
        f0, f1, used = tool.count_flops(model, pruned, x,
                                        CostModel(model, comb), kept)
        assert used.startswith(counter) and 0 < f1 < f0, (used, f0, f1)


def test_verification_copy_keeps_generic_weights_only():
    """``redraw_weights=False`` (what verification checks): a weight that is
    already generic is kept, one far off the fan-in gain is scaled to it,
    a zero-initialised or constant one is drawn; 1-D tensors always are."""
    from cpd_mm.comb import generic_copy
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1),
                          nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight.mul_(100)
        nn.init.constant_(model[3].weight, 0.1)
        nn.init.zeros_(model[4].weight)
    c = generic_copy(model, redraw_weights=False)
    assert c[0].weight is model[0].weight  # kaiming init: generic
    gain = c[2].weight.flatten(1).pow(2).sum(1).mean().sqrt()
    assert abs(float(gain) - 1) < 1e-4  # scaled to the drawn gain
    assert torch.allclose(c[2].weight / c[2].weight.norm(),
                          model[2].weight / model[2].weight.norm())
    for i in (3, 4):  # constant and zero: drawn
        w = c[i].weight.flatten(1)
        assert bool((w.amax(1) > w.amin(1)).all())
    assert float(c[1].weight.min()) >= 0.5 and bool((c[1].bias != 0).all())
    assert float(model[4].weight.abs().max()) == 0  # the model is untouched


def test_affine_buffers_are_redrawn():
    """mmcv's ConvAWS2d keeps its affine terms as buffers at 1 and 0: the
    generic copy draws them, or a rule that drops them would pass."""
    from mmcv.cnn import ConvAWS2d
    from cpd_mm.comb import generic_copy
    m = nn.Sequential(ConvAWS2d(3, 8, 3))
    g = generic_copy(m)[0]
    assert not torch.equal(g.weight_gamma, torch.ones_like(g.weight_gamma))
    assert (g.weight_beta != 0).all()
    assert torch.equal(m[0].weight_gamma, torch.ones_like(g.weight_gamma))
