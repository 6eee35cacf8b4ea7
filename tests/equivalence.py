"""Shared check of the equivalence invariant: gated == pruned.

Every check runs on a copy of the model with generic weights
(:func:`cpd_mm.comb.generic_copy`, the helper comb's own verification and
``tools/check_pruning.py`` use): inside a branch that is silent at
initialisation (BN gamma = 0 from ``zero_init_residual``, a layer scale of
1e-6, a zero-initialised head) any rule would pass.
"""
import copy

import numpy as np
import torch

from cpd_mm.comb import comb_model, generic_copy
from cpd_mm.comb.verify import model_outputs, relative_difference
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


def gated_vs_pruned(model, comb, kept, x, forward=None):
    """Outputs of ``model`` gated with ``kept`` and of a pruned copy:
    ``(gated, pruned outputs, pruned model)``."""
    gates = ChannelGates(model, comb)
    gates.set_kept(kept)
    try:
        with torch.no_grad():
            gated = model_outputs(model, x, forward)
    finally:
        gates.remove()
    pruned = prune_model(copy.deepcopy(model), comb, kept)
    with torch.no_grad():
        small = model_outputs(pruned, x, forward)
    return gated, small, pruned


def assert_equivalent(model, shape, ratio=0.5, seed=0, leave_one=False,
                      forward=None, min_groups=1, dtype=torch.float32,
                      tol=TOL):
    """Comb ``model``, remove channels at random, compare gated vs pruned
    on a copy with generic weights.

    ``dtype=torch.float64`` (with a tight ``tol``) checks exactness without
    float32 rounding, which ill-conditioned random networks amplify.
    Returns (comb, kept, pruned generic copy, max relative difference).
    """
    torch.manual_seed(seed)
    model.to(dtype).eval()
    # the rules themselves are under test: no self-verification here
    comb = comb_model(model, example_inputs=torch.randn(*shape, dtype=dtype),
                      forward=forward, verify=False)
    assert len(comb.prunable_groups) >= min_groups, comb.frozen_reasons()
    kept = random_kept(comb, ratio, np.random.default_rng(seed), leave_one)
    assert (~kept).any(), 'the plan removes nothing: the test would be vacuous'
    subject = generic_copy(model, seed)
    x = torch.randn(*shape, dtype=dtype)
    gated, small, pruned = gated_vs_pruned(subject, comb, kept, x, forward)
    assert all(bool(torch.isfinite(t).all()) for t in gated), \
        'outputs are not finite on generic weights'
    n0 = sum(p.numel() for p in model.parameters())
    n1 = sum(p.numel() for p in pruned.parameters())
    assert n1 < n0, 'surgery removed no parameter'
    # the hook's sparsity is counted by the cost model: it must be exact
    assert CostModel(model, comb).params(kept) == n1
    diff, why = relative_difference(gated, small)
    assert diff is not None, why
    assert diff <= tol, f'gated and pruned differ: {diff:.3e}'
    return comb, kept, pruned, diff
