"""One model of the zoo: build, comb, prune at random, compare (in-process).

:func:`check_model` is what ``benchmarks/zoo_coverage.py`` runs in a
subprocess per model and what ``tests/test_zoo_coverage.py`` calls directly.
It uses only cpd_mm's public API (``comb_model``, ``default_forward``,
``ChannelGates``, ``prune_model``, ``CostModel``) and the random plan of
``tools/check_pruning.py``, so it checks exactly what a user gets.

Gated and pruned outputs are compared on a copy with generic weights
(``cpd_mm.comb.generic_copy``, as comb's verification and
``tools/check_pruning.py`` do; ``weights='own'`` for the model as built),
so a branch that is silent at initialisation cannot hide a wrong rule.
Where generic weights give outputs that are not finite, the model's own
are used and ``res['weights']`` says so.

Statuses: ``exact``, ``differs`` (max relative difference above the
tolerance, or output shapes differ), ``raises`` (gating, surgery or the
pruned forward raised), ``comb fails``, ``build fails``, ``forward fails``
(the model's own tensor-mode forward raises at every tried input size:
an upstream limit, e.g. heads that need data samples), ``skipped``.
"""
import copy
import importlib.util
import inspect
import os.path as osp
import re
import time

import numpy as np
import torch

from zoo_util import first_divergence, max_rel_diff, outputs, short_error

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _tool(name):
    """``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f'_cpd_tool_{name}', osp.join(REPO, 'tools', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def comb_kwargs(verify):
    """``verify=...`` for comb_model when it accepts one; ``None`` keeps
    comb_model's own default. Returns (kwargs, effective verify or None)."""
    from cpd_mm.comb import comb_model
    params = inspect.signature(comb_model).parameters
    if 'verify' not in params:
        return {}, None
    if verify is None:
        default = params['verify'].default
        return {}, default if isinstance(default, bool) else None
    return dict(verify=bool(verify)), bool(verify)


def channel_count(comb):
    """Number of channels of a CombResult (``num_classes`` before the rename
    the lead plans, ``num_channels`` after)."""
    for attr in ('num_channels', 'num_classes'):
        if hasattr(comb, attr):
            return int(getattr(comb, attr))
    raise AttributeError('CombResult has neither num_channels nor num_classes')


def _frozen_count(comb):
    frozen = getattr(comb, 'frozen_channels', None)
    if frozen is None or callable(frozen):
        frozen = comb.frozen_classes
    return int(np.asarray(frozen).sum())


def _mmengine_flops(model, x):
    from mmengine.analysis import get_model_complexity_info
    return get_model_complexity_info(model, inputs=(x, ), show_table=False,
                                     show_arch=False)['flops']


def _runs(fn, model, x):
    try:
        with torch.no_grad():
            fn(model, x)
        return ''
    except Exception as e:  # noqa: BLE001 -- any failure means "try next"
        return short_error(e)['error']


def _own_forward(model, x):
    """The model's own tensor path (``mode='tensor'`` for OpenMMLab)."""
    return model(x)


def rng_dependent(model, x):
    """Whether the model's output depends on the RNG in eval mode."""
    try:
        with torch.no_grad():
            a, b = outputs(model, x, seed=0), outputs(model, x, seed=1)
    except Exception:  # noqa: BLE001 -- comb will report it
        return None
    diff, _ = max_rel_diff(a, b)
    return diff is None or diff > 0


def pick_input(model, sizes, channels=3):
    """Pick the input: the first side of ``sizes`` at which the model's own
    forward runs in float32, and the dtype (float64 where
    :func:`default_forward` runs in it). Returns (side or None, dtype,
    notes on what failed)."""
    tried = []
    model.float()
    for s in sizes:
        x = torch.randn(1, channels, s, s)
        err = _runs(_own_forward, model, x)
        if not err:
            break
        tried.append(f'{s}: {err}')
    else:
        return None, None, tried
    err = _runs(outputs, model, x)
    if err:  # comb will fail on it too, with its traceback: let it
        tried.append(f'default_forward at {s}: {err}')
        return s, torch.float32, tried
    model.double()
    err = _runs(outputs, model, x.double())
    if err:
        model.float()
        tried.append(f'float64 at {s}: {err}')
        return s, torch.float32, tried
    return s, torch.float64, tried


def group_ids(g):
    """Global channel ids of a group (``classes`` before the planned
    rename)."""
    for attr in ('channels', 'ids', 'classes'):
        v = getattr(g, attr, None)
        if isinstance(v, np.ndarray):
            return v
    raise AttributeError('ChannelGroup has no channel id array')


def mixed_plan(comb, seed):
    """Each prunable group loses its own random share in [0.1, 0.9] (never
    all): shows rules that hold only when coupled groups shrink alike."""
    rng = np.random.default_rng(seed + 1000)
    kept = np.ones(channel_count(comb), dtype=bool)
    for g in comb.groups:
        free = np.nonzero(~g.frozen)[0]
        n = min(int(round(len(free) * rng.uniform(0.1, 0.9))), len(free) - 1)
        if n > 0:
            kept[group_ids(g)[rng.choice(free, n, replace=False)]] = False
    return kept


def compare(model, comb, kept, x, diagnose=True):
    """Gate ``model`` with ``kept``, prune a copy, compare the outputs.
    Returns (result dict, pruned model or None)."""
    from cpd_mm.prune import ChannelGates, prune_model
    tol = TOL[x.dtype]
    out, stage, gates = dict(removed=int((~kept).sum())), 'gating', None
    try:
        gates = ChannelGates(model, comb)
        gates.set_kept(kept)
        with torch.no_grad():
            y_gated = outputs(model, x)
        gates.remove()  # before the copy: hooks would travel with it
        gates = None
        stage = 'surgery'
        pruned = prune_model(copy.deepcopy(model), comb, kept)
        out['params_pruned'] = sum(p.numel() for p in pruned.parameters())
        stage = 'pruned forward'
        with torch.no_grad():
            y_pruned = outputs(pruned, x)
    except Exception as e:  # noqa: BLE001
        out.update(status='raises', stage=stage, **short_error(e))
        if gates is not None:
            gates.remove()
        return out, None
    diff, why = max_rel_diff(y_gated, y_pruned)
    out['max_rel_diff'] = diff
    if diff is None:
        out.update(status='differs', error=why)
    else:
        out['status'] = 'exact' if diff <= tol else 'differs'
    if out['status'] == 'differs' and diagnose:
        gates = ChannelGates(model, comb)
        gates.set_kept(kept)
        try:
            out['first_divergence'] = first_divergence(model, pruned, x, tol)
        except Exception as e:  # noqa: BLE001 -- diagnosis only
            out['first_divergence'] = 'n/a: ' + short_error(e)['error']
        gates.remove()
    return out, pruned


def checked_subject(model, x, weights, seed, res):
    """The model the comparison runs on: a generic copy, or the model
    itself (``weights='own'``, or generic outputs that are not finite)."""
    from cpd_mm.comb import generic_copy
    if weights == 'own':
        res['weights'] = 'own'
        return model
    subject = generic_copy(model, seed)
    try:
        with torch.no_grad():
            ys = outputs(subject, x)
        finite = all(bool(torch.isfinite(t).all()) for t in ys
                     if t.is_floating_point())
    except Exception:  # noqa: BLE001 -- the comparison reports it
        finite = True
    res['weights'] = 'generic' if finite else \
        'own (generic weights give outputs that are not finite)'
    return subject if finite else model


def prune_check(model, x, res, ratio=0.5, seed=0, verify=None,
                diagnose=True, mixed=True, weights='generic'):
    """Comb ``model`` on ``x``, prune the random plan of
    tools/check_pruning.py, compare gated and pruned outputs; fills ``res``
    (status, groups, frozen reasons, FLOPs kept ...; with ``mixed`` also
    ``res['mixed']`` for a plan with a different share per group) and
    returns the pruned model (None when a step raised). The outputs are
    compared on :func:`checked_subject`."""
    from cpd_mm.comb import comb_model, default_forward
    from cpd_mm.prune import CostModel
    kwargs, res['verify'] = comb_kwargs(verify)
    try:
        t0 = time.perf_counter()
        comb = comb_model(model, example_inputs=x, forward=default_forward,
                          **kwargs)
        res['comb_s'] = round(time.perf_counter() - t0, 2)
    except Exception as e:  # noqa: BLE001
        res.update(status='comb fails', **short_error(e))
        return None
    n = channel_count(comb)
    res.update(groups=len(comb.groups),
               prunable_groups=len(comb.prunable_groups), channels=n,
               frozen=_frozen_count(comb),
               frozen_reasons=dict(sorted(
                   comb.frozen_reasons().items(), key=lambda kv: -kv[1])),
               unhandled_ops=dict(getattr(comb, 'unhandled_ops', {})),
               uncalled=list(getattr(comb, 'uncalled', []))[:10])
    # the model's outputs are always frozen: the share counts the rest
    out_only = sum(int(g.frozen.sum()) for g in comb.groups
                   if g.reasons and all(r.startswith('model output')
                                        for r in g.reasons))
    res['frozen_share'] = (res['frozen'] - out_only) / max(n - out_only, 1)
    kept = _tool('check_pruning').random_plan(comb, ratio, seed)
    try:
        cost = CostModel(model, comb)
        res['flops_kept'] = cost.flops(kept) / max(cost.total_flops, 1)
        res['params_kept_pred'] = int(cost.params(kept))
    except Exception as e:  # noqa: BLE001
        res['cost_error'] = short_error(e)['error']
    subject = checked_subject(model, x, weights, seed, res)
    out, pruned = compare(subject, comb, kept, x, diagnose)
    res.update(out)
    if pruned is not None and 'params_kept_pred' in res:
        res['cost_params_exact'] = res['params_kept_pred'] == \
            res['params_pruned']
    if mixed and res['prunable_groups']:
        m, _ = compare(subject, comb, mixed_plan(comb, seed), x, diagnose)
        res['mixed'] = m
    return pruned


def _dtype_error(res):
    errs = [res.get('error', ''), (res.get('mixed') or {}).get('error', '')]
    return any(re.search(r'same dtype|expected scalar type|Double and Float',
                         e or '') for e in errs)


def check_model(entry, verify=None, ratio=0.5, seed=0, mmengine_flops=True,
                dtype=None, log=print, weights='generic'):
    """Run the exactness check on one zoo entry; returns a JSON-able dict.

    Args:
        entry: a :class:`zoo_models.Entry`.
        verify: passed to ``comb_model(verify=...)`` if it accepts it;
            ``None`` leaves comb_model's default.
        ratio: share of every prunable group removed at random.
        dtype: force a dtype (default: float64 where the model runs in it).
        mmengine_flops: also measure the FLOPs ratio with mmengine's counter.
        weights: ``'generic'`` (compare on a copy with re-drawn weights) or
            ``'own'`` (the model as built).
    """
    res = dict(key=entry.key, codebase=entry.codebase, family=entry.family,
               model=entry.name, status='', ratio=ratio, seed=seed)
    if entry.skip:
        res.update(status='skipped', error=entry.skip)
        return res
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        model = entry.build()
    except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
        res.update(status='build fails', **short_error(e))
        return res
    model.eval()
    res['build_s'] = round(time.perf_counter() - t0, 2)
    res['params'] = sum(p.numel() for p in model.parameters())
    sizes = entry.sizes(model)
    size, dt, tried = pick_input(model, sizes, entry.in_channels)
    if tried:
        res['input_notes'] = tried
    if size is None:
        res.update(status='forward fails', error='its own forward '
                   f'(tensor mode) raises at sizes {sizes}: {tried[-1]}')
        return res
    if dtype is not None and dtype != dt:
        dt = dtype
    model.to(dt)
    res.update(input=size, dtype=str(dt).replace('torch.', ''),
               tol=TOL[dt])
    log(f'{entry.key}: input {size}x{size} {res["dtype"]}, '
        f'{res["params"] / 1e6:.2f} M params')
    x = torch.randn(1, entry.in_channels, size, size, dtype=dt)
    res['rng_dependent'] = rng_dependent(model, x)
    base = set(res)
    pruned = prune_check(model, x, res, ratio=ratio, seed=seed,
                         verify=verify, weights=weights)
    if dt == torch.float64 and _dtype_error(res):
        # cpd_mm's surgery broke float64 (a module rebuilt in the default
        # dtype): record that, and check the structure in float32
        f64 = {k: res.pop(k) for k in list(res) if k not in base}
        model.float()
        x = x.float()
        res.update(dtype='float32', tol=TOL[torch.float32],
                   float64_error=f64.get('error') or
                   f64.get('mixed', {}).get('error'))
        pruned = prune_check(model, x, res, ratio=ratio, seed=seed,
                             verify=verify, weights=weights)
    if pruned is None:
        return res
    if mmengine_flops:
        try:
            f0 = _mmengine_flops(model, x)
            res['mmengine_flops_kept'] = _mmengine_flops(pruned, x) / f0
        except Exception as e:  # noqa: BLE001 -- jit tracing may fail
            res['mmengine_error'] = short_error(e)['error']
    return res
