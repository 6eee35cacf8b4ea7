"""What verification does once rather than per check, and what that must
not change: gates are built once per checked model and leave no trace, the
pruned copies carry none, and the generic copy's test for weights that are
already generic reads two lines of a generic weight yet gives the verdict
of a full read. (Timings: benchmarks/verify_cost.py; these tests count
work.)"""
import math

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

import cpd_mm.comb.plan_check as plan_check
from cpd_mm.comb import comb_model, verify_comb
from cpd_mm.comb.generic import fan_in_gain
from cpd_mm.comb.plan_check import PlanChecker, failing_groups
from cpd_mm.comb.surgery import structural_copy
from cpd_mm.comb.verify import random_plans
from test_comb_verify import ManyGroups

BAD = (0, 29, 63)


def _assert_plain(model):
    """No gate left behind: no hook, no patched forward."""
    for name, m in model.named_modules():
        assert 'forward' not in vars(m), name
        for k, v in vars(m).items():
            if 'hook' in k and isinstance(v, dict):
                assert not v, (name, k)


@pytest.fixture
def gates_built(monkeypatch):
    """The models ChannelGates was built on, in order."""
    built = []
    real = plan_check.ChannelGates

    def counting(model, comb):
        built.append(model)
        return real(model, comb)
    monkeypatch.setattr(plan_check, 'ChannelGates', counting)
    return built


def test_gates_are_built_once_per_verification(gates_built):
    """Three bad groups among 64: about twenty checks (plans, bisections),
    one set of gates on the generic copy, built again only after the
    plain runs that confirm the first failure."""
    comb = comb_model(ManyGroups(64, BAD), input_shape=(1, 3, 4, 4))
    v = comb.verification
    assert sorted(v.frozen) == sorted(f'branches.{i}' for i in BAD)
    assert len(gates_built) <= 2 < v.checks, (len(gates_built), v.checks)


def test_the_checked_model_is_left_plain(gates_built):
    """On the model's own weights the gates sit on the user's model for
    the whole verification (bisection included), and are gone after it;
    likewise after the final check's :func:`failing_groups` and after each
    check of a checker used outside ``with``."""
    model = ManyGroups(16, (5, )).eval()
    comb = comb_model(model, input_shape=(1, 3, 4, 4), verify=False)
    x = torch.randn(1, 3, 4, 4)
    v = verify_comb(model, comb, x, weights='own')
    assert list(v.frozen) == ['branches.5'] and v.checks > 2
    assert all(m is model for m in gates_built)
    _assert_plain(model)

    comb = comb_model(model, input_shape=(1, 3, 4, 4), verify=False)
    kept = random_plans(comb)[0]
    assert list(failing_groups(model, comb, kept, x, 1e-5)) == ['branches.5']
    _assert_plain(model)
    checker = PlanChecker(model, comb, x, None, 1e-5)
    assert checker.fails(kept) is not None
    _assert_plain(model)


class Shift(nn.Module):
    """A per-channel shift no handler knows: its output is gated by a
    forward hook (not through parameters)."""

    def __init__(self, c):
        super().__init__()
        self.b = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x + self.b.view(1, -1, 1, 1)


def _shift_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), Shift(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3)).eval()


def test_pruned_copies_carry_no_gate(monkeypatch):
    """Pruned copies come from a twin taken before the gates: a gate hook
    on the checked model must not reach them. The model is one where it
    matters: copies that share its hook dicts run the gate on the pruned
    width and the exact group is frozen."""
    comb = comb_model(_shift_net(), input_shape=(1, 3, 16, 16))
    assert comb.verification.frozen == {} and comb.group('0').prunable
    monkeypatch.setattr(plan_check, 'structural_twin', structural_copy)
    comb = comb_model(_shift_net(), input_shape=(1, 3, 16, 16))
    assert 'pruned model raised' in comb.verification.frozen['0']


# ---------------------------------------------- already generic weights
def _full_read_gain(weight):
    """:func:`fan_in_gain` by its definition, every line read in full."""
    w = weight.detach().flatten(1).double()
    sumsq = float((w * w).sum())
    gain = math.sqrt(sumsq / w.shape[0]) if math.isfinite(sumsq) else 0.0
    if gain < 0.01 or bool((w.amax(1) == w.amin(1)).any()):
        return None
    if w.shape[0] > 1 and bool((w.amax(0) == w.amin(0)).any()):
        return None
    return gain


def _weights():
    """Generic weights, and ones built to fool a shortcut: a constant row
    or column among generic ones, lines whose first two entries match but
    that are not constant, two equal rows, ±1 weights (ties everywhere),
    a single row or column, zero, NaN, inf, half and double precision."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    out = [p.detach() for p in torchvision.models.resnet18().parameters()
           if p.dim() >= 2][:8]
    for shape in ((16, 4, 3, 3), (12, 7), (9, 1), (1, 9), (2, 2)):
        base = torch.randn(shape, generator=g).flatten(1)
        n, k = base.shape
        variants = [base, torch.zeros_like(base),
                    torch.randint(0, 2, base.shape, generator=g) * 2. - 1,
                    torch.full_like(base, float('nan')),
                    torch.full_like(base, float('inf'))]
        for i in range(n):
            v = base.clone()
            v[i] = 0.3  # a constant row
            variants.append(v)
        for j in range(k):
            v = base.clone()
            v[:, j] = -0.7  # a constant column
            variants.append(v)
        if k > 1:
            v = base.clone()
            v[:, 1] = v[:, 0]  # every row starts with a tie
            variants.append(v)
        if n > 1:
            v = base.clone()
            v[1] = v[0]  # every column starts with a tie
            variants.append(v)
        for v in variants:
            v = v.reshape(shape)
            out += [v, v.double(), v.half()]
    return out


def test_generic_weight_test_gives_the_full_read_verdict():
    weights = _weights()
    verdicts = [fan_in_gain(w) is None for w in weights]
    assert 0 < sum(verdicts) < len(verdicts)  # both verdicts occur
    for w in weights:
        got, want = fan_in_gain(w), _full_read_gain(w)
        assert (got is None) == (want is None), (tuple(w.shape), got, want)
        if want is not None:
            assert math.isclose(got, want, rel_tol=1e-3)


class _Reduced(TorchFunctionMode):
    """Entries reduced by amax/amin (the constant-line test) under it."""

    def __init__(self):
        super().__init__()
        self.entries = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.amax, torch.Tensor.amin, torch.amax,
                    torch.amin):
            self.entries += args[0].numel()
        return func(*args, **(kwargs or {}))


def test_generic_weight_test_reads_two_lines_of_a_generic_weight():
    """The constant-line test reads a line in full only where its first
    two entries match: none of a generic weight (the full read cost four
    passes over it, as much as the copy's other work together)."""
    conv = nn.Conv2d(64, 256, 3)  # kaiming-uniform init: generic
    with _Reduced() as reduced:
        assert fan_in_gain(conv.weight) is not None
    assert reduced.entries == 0
    tied = conv.weight.detach().clone()
    rows = tied.view(len(tied), -1)
    rows[:, 1] = rows[:, 0]  # ties in every row: those are read in full
    with _Reduced() as reduced:
        assert fan_in_gain(tied) is not None
    assert 0 < reduced.entries <= 2 * tied.numel()
