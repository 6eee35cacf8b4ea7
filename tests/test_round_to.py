"""``round_to`` holds per producing module, not per group: the branches of a
concat group (mmdet's CSPLayer with channel attention) each keep a multiple
of ``round_to`` of their own output channels (or all of them)."""
import copy

import numpy as np
import pytest
import torch

from cpd_mm.comb import comb_model
from cpd_mm.prune import CostModel, prune_model, select_channels

pytest.importorskip('mmdet')


def _csp_layer(channels):
    from mmdet.models.layers import CSPLayer
    torch.manual_seed(0)
    layer = CSPLayer(channels, channels, expand_ratio=0.5, num_blocks=1,
                     channel_attention=True).eval()
    x = torch.randn(1, channels, 16, 16)
    return layer, x, comb_model(layer, example_inputs=x)


@pytest.fixture(scope='module', params=[64, 40])
def csp(request):
    """64: branches of 32 channels; 40: of 20 (off every multiple of 8)."""
    return _csp_layer(request.param)


def _off_width(comb, kept, round_to):
    """Producing modules whose kept width is neither a multiple of
    ``round_to`` nor their full width."""
    names = {}
    for p in comb.producers:
        c = comb.channels(p.atoms).ravel()
        names.setdefault(p.name, set()).update(c[c >= 0].tolist())
    out = {}
    for name, chans in names.items():
        c = np.fromiter(chans, np.int64)
        n = int(kept[c].sum())
        if n != c.size and n % round_to:
            out[name] = (n, c.size)
    return out


def test_concat_group_has_one_segment_per_branch(csp):
    """Segments: one per concat branch, joined by the attention's fc."""
    layer, _, comb = csp
    g = comb.group('short_conv.conv')
    sets = comb.producer_segments()[comb.groups.index(g)]
    # the channel attention's fc outputs both branches: one set of two
    assert len(sets) == 1, [[len(s) for s in ss] for ss in sets]
    segs = sets[0]
    half = layer.main_conv.conv.out_channels
    assert sorted(len(s) for s in segs) == [half, half]
    assert np.array_equal(np.sort(np.concatenate(segs)), np.sort(g.channels))
    for p in ('main_conv.conv', 'short_conv.conv'):
        out = np.unique(comb.channels(comb.records[p].outputs))
        assert any(np.array_equal(np.sort(s), out) for s in segs), p


@pytest.mark.parametrize('ranking', ['cost', 'score'])
@pytest.mark.parametrize('round_to', [8, 16])
def test_every_producer_keeps_a_multiple(csp, round_to, ranking):
    layer, x, comb = csp
    cost = CostModel(layer, comb)
    full = np.ones(comb.num_channels, dtype=bool)
    g = comb.group('short_conv.conv')
    cut = 0
    for seed in range(4):
        scores = np.random.default_rng(seed).random(comb.num_channels)
        for share in (0.8, 0.6, 0.4):
            kept = select_channels(scores, full, comb, cost,
                                   share * cost.params(full), 'params',
                                   round_to=round_to, ranking=ranking,
                                   max_removal=0.9)
            assert not _off_width(comb, kept, round_to), (seed, share)
            cut += not kept[g.channels].all()
    assert cut, 'the concat group was never pruned: the test is vacuous'
    # the physically pruned layer has these widths
    pruned = prune_model(copy.deepcopy(layer), comb, kept)
    for p in ('main_conv', 'short_conv'):
        n = getattr(pruned, p).conv.out_channels
        assert n % round_to == 0 or n == layer.final_conv.conv.in_channels // 2
    assert pruned(x).shape == (1, layer.final_conv.conv.out_channels, 16, 16)


def test_smallest_structure_keeps_multiples(csp):
    """The hook's reachability check runs the selection to an empty budget
    with zero scores: the smallest structure it finds keeps the rule too."""
    layer, _, comb = csp
    cost = CostModel(layer, comb)
    full = np.ones(comb.num_channels, dtype=bool)
    smallest = select_channels(np.zeros(comb.num_channels), full, comb, cost,
                               0.0, 'params', round_to=8, max_removal=1.0,
                               ranking='score')
    assert not _off_width(comb, smallest, 8)
    g = comb.group('short_conv.conv')
    assert smallest[g.channels].sum() < g.size
    for c in comb.producer_channels():
        assert smallest[c].any()
