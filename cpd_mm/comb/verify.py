"""Self-verification: comb checks every group it hands back.

Rules are written for the constructs someone thought of; users bring others.
After tracing, a few random plans are applied twice, as gates on the model
and physically on a copy, and the outputs compared (the equivalence
invariant). When a plan fails, the offending groups are isolated by
bisection over groups (group testing: about log2(G) checks per bad group
of G) and frozen with the reason, so a rule that is missing costs prunable
channels, never a wrong model.

A difference above the tolerance in the model's own precision is checked
again in float64 before it counts, so float32 rounding in deep random
networks does not freeze a correct group.
"""
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
from .groups import CombResult
from .surgery import prune_model, structural_copy

FAILED = 'failed exactness check'


@dataclass
class Verification:
    """What verification did: checks run, seconds, groups frozen."""
    checks: int = 0
    seconds: float = 0.0
    plans: List[str] = field(default_factory=list)
    frozen: Dict[str, str] = field(default_factory=dict)  # group -> reason
    max_difference: float = 0.0   # largest one among passing checks

    def __str__(self):
        return (f'{self.checks} checks in {self.seconds:.2f} s, '
                f'{len(self.frozen)} group(s) frozen')


def model_outputs(model, x, forward, seed=0):
    """Floating-point outputs of ``forward(model, x)``; random ops inside
    (a head drawing bases in eval mode) replay the same numbers every time."""
    devices = [x.device] if x.device.type == 'cuda' else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = (forward or default_forward)(model, x)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def _short(e: BaseException) -> str:
    msg = ' '.join(str(e).split())
    return f'{type(e).__name__}: {msg[:160]}'


def random_plans(comb: CombResult, seed: int = 0):
    """Two complementary plans: in each, half of the prunable groups keep
    one channel and the others keep a random share (20-80%); every group
    gets both treatments across the two plans."""
    rng = np.random.default_rng(seed)
    groups = comb.prunable_groups
    lone = rng.random(len(groups)) < 0.5
    plans = []
    for flip in (False, True):
        kept = np.ones(comb.num_channels, dtype=bool)
        for g, one in zip(groups, lone ^ flip):
            free = np.nonzero(~g.frozen)[0]
            n_frozen = g.size - len(free)
            if one:
                n = len(free) - (0 if n_frozen else 1)
            else:
                n = int(round(len(free) * rng.uniform(0.2, 0.8)))
                n = min(max(n, 1), len(free) - (0 if n_frozen else 1))
            if n > 0:
                kept[g.channels[rng.choice(free, n, replace=False)]] = False
        # a group cut to one channel may empty one of its producers (one
        # branch of a concat): keep one of each, as the schedule does
        kept |= comb.one_per_producer(kept, rng.random(comb.num_channels))
        plans.append(kept)
    return plans


class _Checker:
    """Gated vs pruned outputs for a keep-mask restricted to some groups."""

    def __init__(self, model, comb, x, forward, tol, scales=None):
        self.model, self.comb, self.x = model, comb, x
        self.forward, self.tol = forward, tol
        self.scales = scales  # output magnitudes of the unpruned model
        self.checks = 0
        self.max_difference = 0.0
        self.constant = False   # the last gated outputs had no spread
        self._double = None

    def restrict(self, kept, groups):
        out = np.ones_like(kept)
        for g in groups:
            out[g.channels] = kept[g.channels]
        return out

    def difference(self, model, x, kept) -> (Optional[float], str):
        """``(max relative difference, '')`` or ``(None, error)``."""
        self.checks += 1
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
        self.constant = all(float(a.max() - a.min()) == 0 for a in gated)
        if len(gated) != len(pruned):
            return None, 'the pruned model returns a different number ' \
                'of outputs'
        diff = 0.0
        scales = self.scales or [0.0] * len(gated)
        for a, b, ref in zip(gated, pruned, scales):
            if a.shape != b.shape:
                return None, (f'output shape {tuple(b.shape)} instead of '
                              f'{tuple(a.shape)}')
            # relative to the unpruned model's output: a plan that silences
            # an output must not turn rounding noise into a difference
            scale = max(float(a.abs().max()), ref, 1e-12)
            diff = max(diff, float((a - b).abs().max()) / scale)
        return diff, ''

    def fails(self, kept) -> Optional[str]:
        """None if the plan is exact, else the reason."""
        diff, err = self.difference(self.model, self.x, kept)
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


def _find_bad(checker, kept, groups, reason):
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


def _informative_copy(model, x, forward):
    """A model whose outputs do not depend on its input (zero-initialised
    heads) cannot show a difference: check a copy whose all-zero weights are
    drawn at random instead. None if the model is informative."""
    with torch.no_grad():
        outs = model_outputs(model, x, forward)
    if not all(float(a.max() - a.min()) == 0 for a in outs):
        return None
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return other


def verify_comb(model: nn.Module, comb: CombResult, x: torch.Tensor,
                forward: Optional[Callable] = None, tol: float = 1e-5,
                seed: int = 0, logger=None,
                reference=None) -> Verification:
    """Check ``comb``'s prunable groups on ``model`` and freeze the ones
    that break the equivalence invariant (in place). ``model`` must be in
    eval mode; it is not modified. ``reference``: the unpruned model's
    outputs on ``x`` (differences are relative to their magnitude)."""
    start = time.perf_counter()
    report = Verification()
    if reference is None:
        with torch.no_grad():
            reference = model_outputs(model, x, forward)
    scales = [float(t.abs().max()) for t in tree_flatten(reference)[0]
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    checker = _Checker(model, comb, x, forward, tol, scales)
    spent = 0
    for name, kept in zip(('A', 'B'), random_plans(comb, seed)):
        report.plans.append(name)
        for _ in range(len(comb.groups) + 1):
            groups = comb.prunable_groups
            if not groups:
                break
            reason = checker.fails(checker.restrict(kept, groups))
            if checker.constant and checker.model is model:
                other = _informative_copy(model, x, forward)
                if other is not None:
                    spent += checker.checks
                    checker = _Checker(other, comb, x, forward, tol)
                    with torch.no_grad():
                        checker.scales = [float(t.abs().max()) for t in
                                          model_outputs(other, x, forward)]
                    reason = checker.fails(checker.restrict(kept, groups))
            if reason is None:
                break
            bad, why = _find_bad(checker, kept, groups, reason)
            why = f'{FAILED}: {why}'
            comb.freeze_group(bad, why)
            report.frozen[bad.name] = why
            kept[bad.channels] = True
            if logger is not None:
                logger(f'comb verification froze group {bad.name}: {why}')
    report.checks = spent + checker.checks
    report.max_difference = checker.max_difference
    report.seconds = time.perf_counter() - start
    return report
