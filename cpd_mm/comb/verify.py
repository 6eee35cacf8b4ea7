"""Self-verification: comb checks every group it hands back.

Rules are written for the constructs someone thought of; users bring others.
After tracing, two random plans are applied, as gates on the model and
physically on a copy, and the outputs compared (the equivalence invariant).
When a plan fails, the offending groups are isolated by bisection over
groups (group testing: about log2(G) checks per bad group of G) and frozen
with the reason, so a rule that is missing costs prunable channels, never a
wrong model.

What the checks run on:

- **Generic weights.** A check is only as good as the weights it runs on:
  inside a branch that is silent at initialisation (BN gamma = 0 from
  ``zero_init_residual``, a layer scale of 1e-6, a zero-initialised head)
  any rule passes. Verification checks a :func:`~cpd_mm.comb.generic.
  generic_copy` of the model (every norm statistic, layer scale, bias and
  position table re-drawn to generic values, and every weight that is not
  already generic: zero, constant or faint ones); where those give
  outputs that are not finite (found with the same two runs) it falls back
  to the model's own weights and says so in ``Verification.weights``.
- **A deterministic forward.** Random ops inside replay the same numbers
  (torch's RNG is seeded before every run). Before the first group is
  blamed for a difference, the unpruned copy runs twice: outputs that still
  differ mean the forward itself is not deterministic (NumPy/Python
  randomness, state updated by the forward, a module forced into training
  mode). No comparison can then tell a wrong group from the noise, so every
  group is frozen with that reason and the advice, none as a failed
  exactness check (``Verification.nondeterministic`` says why).
- **Complementary plans.** In each plan half of the groups keep one
  channel and the others a random 20-80%; across the two plans every group
  gets both treatments, and the one channel a group keeps in one plan is
  removed in the other, so every free channel is removed at least once.

A difference above the tolerance in the model's own precision is checked
again in float64 before it counts, so float32 rounding in deep random
networks does not freeze a correct group. One check (one plan, gated vs
pruned) is :class:`~cpd_mm.comb.plan_check.PlanChecker`; its gates stay on
the checked model for the whole verification.
"""
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .generic import generic_copy
from .groups import CombResult
# the check of one plan; re-exported: callers import it from here
from .plan_check import (PlanChecker, failing_groups,  # noqa: F401
                         float_tensors, isolate_failing_group, model_outputs,
                         relative_difference, replayed_rng)

FAILED = 'failed exactness check'
NOT_VERIFIED = 'not verified'
DETERMINISM_ADVICE = (
    'make the forward deterministic: evaluate in eval mode (no dropout, '
    'drop-path or batch statistics), draw any noise with torch (comb seeds '
    'torch before every run) or seed NumPy/Python inside it, and do not '
    'update state in forward; or pass a forward= that does so')


@dataclass
class Verification:
    """What verification did: checks run, seconds, groups frozen, and on
    what (``weights``; ``nondeterministic``: why the forward could not be
    checked, empty if it could)."""
    checks: int = 0
    seconds: float = 0.0
    plans: List[str] = field(default_factory=list)
    frozen: Dict[str, str] = field(default_factory=dict)  # group -> reason
    max_difference: float = 0.0   # largest one among passing checks
    weights: str = 'generic'
    nondeterministic: str = ''

    def __str__(self):
        if self.nondeterministic:
            return (f'not run: {self.nondeterministic}; '
                    f'{len(self.frozen)} group(s) frozen')
        return (f'{self.checks} checks on {self.weights} weights in '
                f'{self.seconds:.2f} s, {len(self.frozen)} group(s) frozen')


def random_plans(comb: CombResult, seed: int = 0):
    """Two complementary keep-masks: in each, half of the prunable groups
    keep one channel and the others a random share (20-80%); every group
    gets both treatments across the two plans, and the channel it keeps
    alone in one plan is removed in the other (every free channel of every
    group is removed in at least one plan)."""
    rng = np.random.default_rng(seed)
    groups = comb.prunable_groups
    lone = rng.random(len(groups)) < 0.5
    plans = [np.ones(comb.num_channels, dtype=bool) for _ in range(2)]
    for g, one in zip(groups, lone):
        free = rng.permutation(np.nonzero(~g.frozen)[0])
        spare = 0 if g.size > len(free) else 1  # a frozen channel stays
        n_share = int(round(len(free) * rng.uniform(0.2, 0.8)))
        n_share = min(max(n_share, 1), len(free) - spare)
        # the share plan removes free[:n_share]; the lone plan keeps only
        # free[0] (when nothing is frozen), which the share plan removes
        lone_kept, share_kept = plans[0 if one else 1], plans[1 if one else 0]
        lone_kept[g.channels[free[spare:]]] = False
        share_kept[g.channels[free[:n_share]]] = False
    for kept in plans:
        # a group cut to one channel may empty one of its producers (one
        # branch of a concat): keep one of each, as the schedule does
        kept |= comb.one_per_producer(kept, rng.random(comb.num_channels))
    return plans


def _finite(outs):
    return all(bool(torch.isfinite(t).all()) for t in outs)


def _baseline(model, x, forward, tol):
    """Two plain runs of ``model``: ``(outputs, why not usable)``; ``why``
    says that the forward is not deterministic, or that the outputs are not
    finite, or is empty."""
    with torch.no_grad():
        first, second = (model_outputs(model, x, forward) for _ in range(2))
    diff, why = relative_difference(first, second)
    # rounding-level noise (CUDA atomics) is tolerated, far below ``tol``
    if why or diff > tol / 10:
        what = why or f'two runs differ by {diff:.2e} (relative)'
        return first, f'the forward is not deterministic ({what})'
    if not _finite(first):
        return first, 'the outputs are not finite'
    return first, ''


def _confirm(checker, model, kept, reason, report):
    """A plan failed (``reason``) before any group was blamed: run the
    checked model plainly, twice. Returns ``(checker, reason, why)``: the
    checker to go on with (on the model's own weights where generic ones
    give outputs that are not finite), the plan's verdict relative to the
    unpruned outputs, and why nothing can be checked (or '')."""
    checker.release()  # plain runs: no gate
    first, why = _baseline(checker.model, checker.x, checker.forward,
                           checker.tol)
    if why.startswith('the outputs') and checker.model is not model:
        report.weights = f"the model's own ({why} on generic weights)"
        report.checks += checker.checks
        checker = PlanChecker(model, checker.comb, checker.x, checker.forward,
                              checker.tol, hold=True)
        first, why = _baseline(model, checker.x, checker.forward,
                               checker.tol)
        reason = None if why else checker.fails(kept)
    if why:
        return checker, reason, why
    checker.scales = [float(t.abs().max()) if t.numel() else 0.
                      for t in first]
    return checker, checker.rejudge(kept, reason), ''


def _freeze_all(comb, report, reason, logger):
    for g in comb.prunable_groups:
        comb.freeze_group(g, reason)
        report.frozen[g.name] = reason
    if logger is not None:
        logger(f'comb verification froze every group: {reason}')


def verify_comb(model: nn.Module, comb: CombResult, x: torch.Tensor,
                forward: Optional[Callable] = None, tol: float = 1e-5,
                seed: int = 0, logger=None, reference=None,
                weights: str = 'generic') -> Verification:
    """Check ``comb``'s prunable groups and freeze the ones that break the
    equivalence invariant (in place). ``model`` must be in eval mode; it is
    not modified. ``weights``: ``'generic'`` (a copy with re-drawn weights,
    see :mod:`cpd_mm.comb.generic`) or ``'own'`` (the model as it is: a
    silent branch passes whatever its rules do). ``reference`` is accepted
    for compatibility and not used: the reference outputs are those of the
    model the checks run on.

    The plain model runs (twice: is its forward deterministic? are its
    outputs finite?) only once a plan fails: a plan that passes needs no
    reference, since its difference is taken relative to the gated
    outputs, which is stricter."""
    if weights not in ('generic', 'own'):
        raise ValueError(f"verify_comb: weights must be 'generic' or 'own', "
                         f'got {weights!r}')
    start = time.perf_counter()
    report = Verification()
    if not comb.prunable_groups:
        return report
    if weights == 'generic':
        # weights that are already generic stay (a fraction of the cost)
        subject, report.weights = generic_copy(
            model, seed, redraw_weights=False), f'generic (seed {seed})'
    else:
        subject, report.weights = model, "the model's own"
    # gates stay on the checked model from check to check, until the end
    checkers = [PlanChecker(subject, comb, x, forward, tol, hold=True)]
    try:
        _check_plans(checkers, model, comb, seed, report, logger)
    finally:
        checkers[-1].release()
    checker = checkers[-1]
    report.checks += checker.checks
    report.max_difference = checker.max_difference
    report.seconds = time.perf_counter() - start
    return report


def _check_plans(checkers, model, comb, seed, report, logger):
    """Check the two plans and freeze what fails. ``checkers[-1]`` is the
    checker in use (:func:`_confirm` may go on with another one)."""
    checker, confirmed = checkers[-1], False
    for name, kept in zip(('A', 'B'), random_plans(comb, seed)):
        report.plans.append(name)
        for _ in range(len(comb.groups) + 1):
            groups = comb.prunable_groups
            if not groups:
                break
            reason = checker.fails(checker.restrict(kept, groups))
            if reason and not confirmed:
                confirmed = True
                checker, reason, why = _confirm(
                    checker, model, checker.restrict(kept, groups), reason,
                    report)
                checkers.append(checker)
                if why:
                    report.nondeterministic = why \
                        if 'not deterministic' in why else ''
                    advice = f'; {DETERMINISM_ADVICE}' \
                        if report.nondeterministic else ''
                    _freeze_all(comb, report,
                                f'{NOT_VERIFIED}: {why}{advice}', logger)
                    break
            if reason is None:
                break
            bad, why = isolate_failing_group(checker, kept, groups, reason)
            why = f'{FAILED}: {why}'
            comb.freeze_group(bad, why)
            report.frozen[bad.name] = why
            kept[bad.channels] = True
            if logger is not None:
                logger(f'comb verification froze group {bad.name}: {why}')
