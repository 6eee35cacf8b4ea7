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
networks does not freeze a correct group.
"""
import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .forward import default_forward
from .gates import ChannelGates
from .generic import generic_copy
from .groups import CombResult
from .surgery import prune_model, structural_copy

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


@contextlib.contextmanager
def replayed_rng(x, seed=0):
    """Seed torch's RNG for one forward and restore the caller's stream
    afterwards: random ops inside replay the same numbers every time."""
    devices = [x.device] if x.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def float_tensors(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def model_outputs(model, x, forward, seed=0):
    """Floating-point outputs of ``forward(model, x)``; random ops inside
    (a head drawing bases in eval mode) replay the same numbers every time."""
    with replayed_rng(x, seed):
        out = (forward or default_forward)(model, x)
    return float_tensors(out)


def relative_difference(ys, zs, scales=None):
    """``(max over outputs of max|a - b| / scale, '')``, or ``(None, why)``
    when the outputs do not match in number or shape. ``scale`` is the
    largest of ``max|a|``, the matching entry of ``scales`` and 1e-12."""
    if len(ys) != len(zs):
        return None, (f'{len(zs)} outputs instead of {len(ys)}')
    diff = 0.0
    for i, (a, b) in enumerate(zip(ys, zs)):
        if a.shape != b.shape:
            return None, (f'output shape {tuple(b.shape)} instead of '
                          f'{tuple(a.shape)}')
        ref = scales[i] if scales else 0.0
        scale = max(float(a.abs().max()) if a.numel() else 0.0, ref, 1e-12)
        d = float((a - b).abs().max()) / scale if a.numel() else 0.0
        if d != d:
            return None, 'NaN in the outputs'
        diff = max(diff, d)
    return diff, ''


def _short(e: BaseException) -> str:
    msg = ' '.join(str(e).split())
    return f'{type(e).__name__}: {msg[:160]}'


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


class PlanChecker:
    """Gated vs pruned outputs for a keep-mask restricted to some groups."""

    def __init__(self, model, comb, x, forward, tol, scales=None):
        self.model, self.comb, self.x = model, comb, x
        self.forward, self.tol = forward, tol
        self.scales = scales  # output magnitudes of the unpruned model
        self.checks = 0
        self.max_difference = 0.0
        self.last = None  # (gated, pruned) outputs of the last check
        self._double = None

    def restrict(self, kept, groups):
        out = np.ones_like(kept)
        for g in groups:
            out[g.channels] = kept[g.channels]
        return out

    def difference(self, model, x, kept) -> (Optional[float], str):
        """``(max relative difference, '')`` or ``(None, error)``; the
        outputs compared stay in ``self.last``."""
        self.checks += 1
        self.last = None
        gates = ChannelGates(model, self.comb)
        try:
            gates.set_kept(kept)
            with torch.no_grad():
                gated = model_outputs(model, x, self.forward)
        except Exception as e:
            return None, f'the gated model raised {_short(e)}'
        finally:
            gates.remove()
        try:
            small = prune_model(structural_copy(model), self.comb, kept)
            with torch.no_grad():
                pruned = model_outputs(small, x, self.forward)
        except Exception as e:
            return None, f'the pruned model raised {_short(e)}'
        self.last = (gated, pruned)
        # relative to the unpruned model's outputs where known: a plan that
        # silences an output must not turn rounding noise into a difference
        return relative_difference(gated, pruned, self.scales)

    def fails(self, kept) -> Optional[str]:
        """None if the plan is exact, else the reason."""
        return self.judge(kept, *self.difference(self.model, self.x, kept))

    def rejudge(self, kept, reason) -> Optional[str]:
        """:meth:`fails` for the plan just checked (which failed with
        ``reason``), with the scales set since: no new forward."""
        if self.last is None:  # it raised: no scale changes that
            return reason
        return self.judge(kept, *relative_difference(*self.last,
                                                     self.scales))

    def judge(self, kept, diff, err) -> Optional[str]:
        if diff is None:
            return err
        if diff <= self.tol:
            self.max_difference = max(self.max_difference, diff)
            return None
        if diff < 1e-2 and self._float64() is not None:
            # rounding or a real difference? float64 tells
            m64, x64 = self._double
            d64, err = self.difference(m64, x64, kept)
            if d64 is not None and d64 <= 1e-9:
                self.max_difference = max(self.max_difference, diff)
                return None
        return f'max relative difference {diff:.2e} (tolerance {self.tol:g})'

    def _float64(self):
        if self._double is None:
            try:
                m64 = copy.deepcopy(self.model).double()
                x64 = self.x.double()
                with torch.no_grad():
                    model_outputs(m64, x64, self.forward)
                self._double = (m64, x64)
            except Exception:
                self._double = False
        return self._double or None


def isolate_failing_group(checker, kept, groups, reason):
    """One group of ``groups`` (which fail together, with ``reason``) that
    the failure needs, by binary splitting: one check per halving.

    Invariant: ``groups + context`` fails and ``context`` alone passes. If
    the left half with the context fails, search it; else it joins the
    context (it passes) and the failure lies in the right half.
    """
    context = []
    while len(groups) > 1:
        half = len(groups) // 2
        left, right = groups[:half], groups[half:]
        why = checker.fails(checker.restrict(kept, left + context))
        if why:
            groups, reason = left, why
        else:
            context, groups = context + left, right
    if context and reason:
        reason += (f' (with {len(context)} other group(s) pruned, e.g. '
                   f'{context[0].name})')
    return groups[0], reason


def failing_groups(model, comb, kept, x, tol) -> dict:
    """{group name: reason} of the groups whose pruning to ``kept`` breaks
    gated == pruned on ``x`` (``model`` bare, in eval mode), isolated one
    at a time by comb verification's bisection; {} if the whole plan
    passes its check (a float32 difference that float64 clears)."""
    checker = PlanChecker(model, comb, x, None, tol)
    groups = [g for g in comb.groups if not kept[g.channels].all()]
    found = {}
    while groups:
        why = checker.fails(checker.restrict(kept, groups))
        if why is None:
            break
        bad, why = isolate_failing_group(checker, kept, groups, why)
        found[bad.name] = why
        groups.remove(bad)  # kept whole in the next checks
    return found


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
    first, why = _baseline(checker.model, checker.x, checker.forward,
                           checker.tol)
    if why.startswith('the outputs') and checker.model is not model:
        report.weights = f"the model's own ({why} on generic weights)"
        report.checks += checker.checks
        checker = PlanChecker(model, checker.comb, checker.x, checker.forward,
                           checker.tol)
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
    checker = PlanChecker(subject, comb, x, forward, tol)
    confirmed = False
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
    report.checks += checker.checks
    report.max_difference = checker.max_difference
    report.seconds = time.perf_counter() - start
    return report
