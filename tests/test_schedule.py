"""Greedy channel selection: budgets, minimum widths and channel rounding."""
import numpy as np
import pytest
import torch
import torchvision

from cpd_mm.comb import comb_model
from cpd_mm.prune import CostModel, select_channels


@pytest.fixture(scope='module')
def resnet18():
    model = torchvision.models.resnet18(num_classes=10).eval()
    comb = comb_model(model, example_inputs=torch.randn(1, 3, 32, 32))
    return comb, CostModel(model, comb)


def widths(comb, kept):
    return {g.name: (int(kept[g.channels].sum()), g.size)
            for g in comb.prunable_groups}


@pytest.mark.parametrize('metric', ['params', 'flops'])
@pytest.mark.parametrize('round_to', [1, 8, 16])
def test_budget_is_met_with_rounded_widths(resnet18, metric, round_to):
    comb, cost = resnet18
    measure = cost.params if metric == 'params' else cost.flops
    full = np.ones(comb.num_channels, dtype=bool)
    scores = np.random.default_rng(0).random(comb.num_channels)
    target = 0.5 * measure(full)
    kept = select_channels(scores, full, comb, cost, target, metric,
                           round_to=round_to)
    assert measure(kept) <= target
    # lands on the budget within one chunk (marginal costs only fall as
    # channels go, so the full model's are an upper bound)
    chunk = round_to * cost.marginal(full, metric).max()
    assert measure(kept) > target - chunk
    for name, (n, size) in widths(comb, kept).items():
        assert n == size or n % round_to == 0, (name, n, size)
        assert n >= min(size, round_to)
    assert full.all()  # the input mask is not modified


def test_rounding_is_kept_across_steps_and_min_channels(resnet18):
    """A ramp of budgets (as the hook runs it) from an odd start keeps every
    pruned group on a multiple; min_channels rounds up to one."""
    comb, cost = resnet18
    rng = np.random.default_rng(1)
    kept = np.ones(comb.num_channels, dtype=bool)
    total = cost.params(kept)
    for goal in (0.2, 0.4, 0.6, 0.8):
        kept = select_channels(rng.random(comb.num_channels), kept, comb, cost,
                               (1 - goal) * total, 'params', min_channels=12,
                               round_to=8)
        for name, (n, size) in widths(comb, kept).items():
            assert n == size or (n % 8 == 0 and n >= 16), (goal, name, n)
        assert cost.params(kept) <= (1 - goal) * total


def test_lowest_scores_go_first(resnet18):
    comb, cost = resnet18
    g = max(comb.prunable_groups, key=lambda g: g.size)
    scores = np.ones(comb.num_channels)
    scores[g.channels] = 0.0                  # this group is the least useful
    scores[g.channels[:3]] = 2.0              # except three channels
    full = np.ones(comb.num_channels, dtype=bool)
    saving = cost.marginal(full, 'params')[g.channels[3:11]].sum()
    kept = select_channels(scores, full, comb, cost,
                           cost.params(full) - saving, 'params', round_to=8)
    removed = np.nonzero(~kept)[0]
    assert set(removed) <= set(g.channels[3:])
    assert len(removed) == 8
