"""One exactness check: gated vs physically pruned outputs for one plan.

:class:`PlanChecker` runs a model with its channels gated by a keep-mask,
prunes a copy of it to the same mask, runs that, and compares the outputs
(the equivalence invariant); :func:`isolate_failing_group` and
:func:`failing_groups` find the groups a failing plan needs by bisection.
Comb's self-verification (:mod:`cpd_mm.comb.verify`), the pruning run's
final check and ``tools/check_pruning.py`` all judge plans with it.

What a check costs: two forwards (the gated model at full width, the pruned
copy) and one surgery. Inside a ``with`` block the checker attaches its
gates once and only sets the mask per check (building gates reads every
record, about as long as the pruned copy's forward), and takes every pruned
copy from one twin of the model made before any gate was attached.
"""
import contextlib
import copy
from typing import Optional

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from .forward import default_forward
from .gates import ChannelGates
from .generic import structural_twin
from .surgery import prune_model, structural_copy


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


class PlanChecker:
    """Gated vs pruned outputs for a keep-mask restricted to some groups.

    Args:
        model: the model to check, in eval mode (it is gated while a check
            runs and never pruned: pruned copies share its tensors).
        comb: its :class:`~cpd_mm.comb.groups.CombResult`.
        x: the input; ``forward``: ``forward(model, x)`` or None for
            :func:`~cpd_mm.comb.forward.default_forward`.
        tol: the largest relative difference that passes.
        scales: output magnitudes of the unpruned model (a difference is
            taken relative to the larger of these and the gated output).
        hold: keep the gates attached from one check to the next, until
            :meth:`release` (what ``with PlanChecker(...)`` does). Without
            it every check removes its gates again, leaving ``model`` as
            it was.
    """

    def __init__(self, model, comb, x, forward, tol, scales=None,
                 hold=False):
        self.model, self.comb, self.x = model, comb, x
        self.forward, self.tol = forward, tol
        self.scales = scales  # output magnitudes of the unpruned model
        self.hold = hold
        self.checks = 0
        self.max_difference = 0.0
        self.last = None  # (gated, pruned) outputs of the last check
        self._double = None
        self._rigs = {}  # id(model) -> (model, twin, gates)

    def __enter__(self):
        self.hold = True
        return self

    def __exit__(self, *exc):
        self.hold = False
        self.release()

    def release(self):
        """Remove every gate this checker attached: its models are plain
        again (the next check attaches new ones)."""
        rigs, self._rigs = self._rigs, {}
        for _, _, gates in rigs.values():
            gates.remove()

    def _rig(self, model):
        """``(twin, gates)`` of ``model``: ``twin`` a structural copy taken
        before any gate (hook dicts of its own, so copies of it carry no
        gate) that pruned copies are made from, ``gates`` attached to
        ``model``."""
        rig = self._rigs.get(id(model))
        if rig is None or rig[0] is not model:
            twin = structural_twin(model)
            rig = (model, twin, ChannelGates(model, self.comb))
            self._rigs[id(model)] = rig
        return rig[1], rig[2]

    def _plain(self, model):
        """``model`` without gates: its twin while it is gated."""
        rig = self._rigs.get(id(model))
        return rig[1] if rig is not None and rig[0] is model else model

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
        twin, gates = self._rig(model)
        try:
            try:
                gates.set_kept(kept)
                with torch.no_grad():
                    gated = model_outputs(model, x, self.forward)
            except Exception as e:
                return None, f'the gated model raised {_short(e)}'
            try:
                small = prune_model(structural_copy(twin), self.comb, kept)
                with torch.no_grad():
                    pruned = model_outputs(small, x, self.forward)
            except Exception as e:
                return None, f'the pruned model raised {_short(e)}'
        finally:
            if not self.hold:
                self.release()
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
                m64 = copy.deepcopy(self._plain(self.model)).double()
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
    passes its check (a float32 difference that float64 clears). ``model``
    is left without gates."""
    groups = [g for g in comb.groups if not kept[g.channels].all()]
    found = {}
    with PlanChecker(model, comb, x, None, tol) as checker:
        while groups:
            why = checker.fails(checker.restrict(kept, groups))
            if why is None:
                break
            bad, why = isolate_failing_group(checker, kept, groups, why)
            found[bad.name] = why
            groups.remove(bad)  # kept whole in the next checks
    return found
