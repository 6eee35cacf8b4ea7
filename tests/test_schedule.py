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


def _shares(comb, kept):
    return {g.name: kept[g.channels].mean() for g in comb.prunable_groups}


def test_equal_scores_spread_over_groups(resnet18):
    """Tied scores (random initialisation: l1 of a conv before BatchNorm is
    |gamma|+|beta| = 1 for every channel) must not strip whole stages."""
    comb, cost = resnet18
    full = np.ones(comb.num_channels, dtype=bool)
    for scores in (np.zeros(comb.num_channels), np.ones(comb.num_channels)):
        kept = select_channels(scores, full, comb, cost,
                               0.5 * cost.total_params, 'params', round_to=8)
        assert cost.params(kept) <= 0.5 * cost.total_params
        shares = _shares(comb, kept)
        assert min(shares.values()) >= 0.2, shares  # the floor
        if not scores.any():  # pure ties: an even spread
            assert max(shares.values()) - min(shares.values()) < 0.35


def test_floor_is_configurable_and_respected(resnet18):
    comb, cost = resnet18
    full = np.ones(comb.num_channels, dtype=bool)
    scores = np.random.default_rng(0).random(comb.num_channels)
    g = comb.prunable_groups[3]
    scores[g.channels] = 0  # the least useful group by far
    for max_removal, floor in ((0.5, 0.5), (0.9, 0.1)):
        kept = select_channels(scores, full, comb, cost,
                               0.4 * cost.total_params, 'params',
                               max_removal=max_removal)
        assert kept[g.channels].sum() >= np.ceil(floor * g.size)
        assert all(s >= floor - 1e-9 for s in _shares(comb, kept).values())
    # the floor stops the selection before the budget if it must
    kept = select_channels(scores, full, comb, cost, 0.05 * cost.total_params,
                           'params', max_removal=0.5)
    assert cost.params(kept) > 0.05 * cost.total_params


def test_cost_aware_ranking_follows_the_metric(resnet18):
    """With equal importance, a FLOPs budget takes channels where a channel
    costs the most FLOPs (high resolution, early), a parameter budget where
    it holds the most parameters (late)."""
    comb, cost = resnet18
    full = np.ones(comb.num_channels, dtype=bool)
    scores = np.ones(comb.num_channels)

    def costliest(metric):  # the group whose channels save the most
        save = cost.marginal(full, metric)
        return max(comb.prunable_groups,
                   key=lambda g: save[g.channels].mean())
    hot_flops, hot_params = costliest('flops'), costliest('params')
    assert hot_flops.name == 'conv1'            # full resolution
    assert hot_params.name == 'layer4.0.conv2'  # the widest stage
    by = {}
    for metric in ('flops', 'params'):
        kept = select_channels(scores, full, comb, cost,
                               0.7 * cost.total(metric), metric)
        assert cost.evaluate(kept, metric) <= 0.7 * cost.total(metric)
        by[metric] = (kept[hot_flops.channels].mean(),
                      kept[hot_params.channels].mean())
    assert by['flops'][0] < by['params'][0]   # cut for FLOPs, not params
    assert by['params'][1] < by['flops'][1]   # cut for params, not FLOPs
    # the paper's ranking ignores cost: the same plan for both metrics' order
    a = select_channels(scores, full, comb, cost, 0.7 * cost.total_params,
                        'params', ranking='score')
    assert cost.params(a) <= 0.7 * cost.total_params


def test_ranking_is_validated(resnet18):
    comb, cost = resnet18
    full = np.ones(comb.num_channels, dtype=bool)
    with pytest.raises(ValueError, match='ranking'):
        select_channels(np.zeros(comb.num_channels), full, comb, cost, 0,
                        ranking='best')


def test_no_producer_loses_all_its_outputs():
    """MMDetection's CSPLayer with channel attention (RTMDet): the two
    branches are concatenated and the attention couples them, so one group
    spans two producing convs. Verification must not freeze it, and a
    selection that scores one branch lowest keeps one channel of it, so
    surgery can build the pruned layer."""
    pytest.importorskip('mmdet')
    from mmdet.models.layers import CSPLayer

    from cpd_mm.prune import prune_model
    torch.manual_seed(0)
    layer = CSPLayer(32, 32, expand_ratio=0.5, num_blocks=1,
                     channel_attention=True).eval()
    x = torch.randn(1, 32, 16, 16)
    comb = comb_model(layer, example_inputs=x)
    g = comb.group('short_conv.conv')
    assert g.prunable and not g.frozen.any(), g.reasons
    assert 'main_conv.conv' in g.producers
    short = [c for c in comb.producer_channels()
             if np.isin(c, g.channels).all() and c.size < g.size]
    assert short, 'the concat group has one producer per branch'
    scores = np.ones(comb.num_channels)
    scores[short[0]] = 0.0  # this branch would go first, entirely
    cost = CostModel(layer, comb)
    full = np.ones(comb.num_channels, dtype=bool)
    kept = select_channels(scores, full, comb, cost, 0.05 * cost.params(full),
                           'params', max_removal=1.0)
    for c in comb.producer_channels():
        assert kept[c].any()
    pruned = prune_model(layer, comb, kept)
    assert pruned(x).shape[1] == 32
