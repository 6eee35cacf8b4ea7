"""Shared check of the equivalence invariant: gated == pruned."""
import copy

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from cpd_mm.comb import comb_model, default_forward
from cpd_mm.prune import ChannelGates, CostModel, prune_model

TOL = 1e-5


def random_kept(comb, ratio, rng, leave_one=False):
    kept = np.ones(comb.num_channels, dtype=bool)
    for g in comb.groups:
        free = np.nonzero(~g.frozen)[0]
        if len(free) < 2:
            continue
        n = len(free) - 1 if leave_one else min(
            int(round(len(free) * ratio)), len(free) - 1)
        if n > 0:
            kept[g.channels[rng.choice(free, n, replace=False)]] = False
    return kept


def _outs(model, x, forward):
    out = (forward or default_forward)(model, x)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def assert_equivalent(model, shape, ratio=0.5, seed=0, leave_one=False,
                      forward=None, min_groups=1, dtype=torch.float32,
                      tol=TOL):
    """Comb ``model``, remove channels at random, compare gated vs pruned.

    ``dtype=torch.float64`` (with a tight ``tol``) checks exactness without
    float32 rounding, which ill-conditioned random networks amplify.
    Returns (comb, kept, pruned model, max relative difference).
    """
    torch.manual_seed(seed)
    model.to(dtype).eval()
    # the rules themselves are under test: no self-verification here
    comb = comb_model(model, example_inputs=torch.randn(*shape, dtype=dtype),
                      forward=forward, verify=False)
    assert len(comb.prunable_groups) >= min_groups, comb.frozen_reasons()
    kept = random_kept(comb, ratio, np.random.default_rng(seed), leave_one)
    assert (~kept).any(), 'the plan removes nothing: the test would be vacuous'
    x = torch.randn(*shape, dtype=dtype)
    gates = ChannelGates(model, comb)
    gates.set_kept(kept)
    with torch.no_grad():
        gated = _outs(model, x, forward)
    gates.remove()
    n0 = sum(p.numel() for p in model.parameters())
    pruned = prune_model(copy.deepcopy(model), comb, kept)
    n1 = sum(p.numel() for p in pruned.parameters())
    assert n1 < n0, 'surgery removed no parameter'
    # the hook's sparsity is counted by the cost model: it must be exact
    assert CostModel(model, comb).params(kept) == n1
    with torch.no_grad():
        small = _outs(pruned, x, forward)
    assert len(gated) == len(small)
    diff = 0.0
    for a, b in zip(gated, small):
        assert a.shape == b.shape
        d = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        diff = max(diff, d)
    assert diff <= tol, f'gated and pruned differ: {diff:.3e}'
    return comb, kept, pruned, diff
