"""Physical removal of masked channels while training goes on.

:func:`shrink_student` prunes the student in place
(:func:`~cpd_mm.comb.prune_model`) and makes what training holds on its
parameters follow: gradients (a gradient accumulation window may be open),
optimizer state and param groups, EMA copies. Surgery creates new
parameters; which entries of which old parameter each new one holds, and by
what factor (a handler may fold a scale into weights), is found by running
the same surgery on copies whose parameters hold their own indices, so it
is exact whatever a handler does, and it is checked on the real weights
after the shrink: a parameter whose entries cannot be traced back starts
with fresh optimizer state, with a warning naming it.

:func:`map_channels` relates the channels of the shrunk model's comb to
those of the original one, so that plans, costs and the selection stay in
the original channel space.
"""
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..comb.surgery import structural_copy

# optimizer state entries that hold gradient statistics: a parameter
# stored as ``s * w`` has gradient ``g / s`` (exponent of s per entry)
GRADIENT_STATE = {'momentum_buffer': -1, 'exp_avg': -1, 'exp_avg_sq': -2,
                  'max_exp_avg_sq': -2, 'square_avg': -2, 'grad_avg': -1,
                  'sum': -2, 'acc_delta': -2}


class TrainingState:
    """What training holds on the student's parameters, for a shrink.

    Args:
        optimizers: torch optimizers over the student (their state and
            param groups follow the new parameters).
        averaged: averaged copies of ``owner`` (mmengine EMA models).
        owner: the module holding the student (a distiller, or the student
            itself); None: the student.
        rewrap: called after a shrink, to rebuild what holds the old
            parameters (a DDP wrapper), or None.
    """

    def __init__(self, optimizers: Sequence = (), averaged: Sequence = (),
                 owner: Optional[nn.Module] = None,
                 rewrap: Optional[Callable[[], None]] = None):
        self.optimizers, self.averaged = list(optimizers), list(averaged)
        self.owner, self.rewrap = owner, rewrap


class ParamMap:
    """Where a new parameter's entries come from: ``flat[index] * scale``
    of the old parameter ``source`` (``scale`` None: a pure selection)."""
    __slots__ = ('source', 'index', 'scale')

    def __init__(self, source: str, index: torch.Tensor,
                 scale: Optional[torch.Tensor]):
        self.source, self.index, self.scale = source, index, scale

    def take(self, old: torch.Tensor, shape, power: int = 1) -> torch.Tensor:
        """The entries of a tensor shaped like the source, for the new
        parameter (``power``: the state's exponent of the scale)."""
        v = old.detach().reshape(-1)[self.index.to(old.device)].view(shape)
        if self.scale is not None and power:
            v = v * self.scale.to(v).view(shape) ** power
        return v


def _probe(owner, surgery, names, fill):
    """Run ``surgery`` on a structural copy of ``owner`` whose parameters
    ``names`` hold ``fill(k, p)``; ``{new name: values (float64)}``."""
    probe = structural_copy(owner)
    for k, (name, p) in enumerate(names.items()):
        path, _, attr = name.rpartition('.')
        mod = probe.get_submodule(path) if path else probe
        mod._parameters[attr] = nn.Parameter(
            fill(k, p), requires_grad=p.requires_grad)
    surgery(probe)
    return {n: p.detach().double().reshape(-1)
            for n, p in probe.named_parameters()}


def param_maps(owner: nn.Module, surgery: Callable[[nn.Module], None],
               prefix: str = '') -> Dict[str, Optional[ParamMap]]:
    """``{new parameter name: ParamMap or None}`` of ``surgery(owner)``,
    found without touching ``owner``, for the parameters under ``prefix``
    and the trainable ones: one surgery on a copy whose entries hold their
    global index (float64), and, where a result is not an integer (a
    handler folded a scale in), one more whose entries are all one. None:
    entries mix parameters or are not a scaled selection."""
    names = {n: p for n, p in owner.named_parameters()
             if n.startswith(prefix) or p.requires_grad}
    order = list(names)
    sizes = np.array([p.numel() for p in names.values()], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])

    def index(k, p):
        return torch.arange(int(starts[k]), int(starts[k] + sizes[k]),
                            dtype=torch.float64, device=p.device
                            ).view(p.shape)

    idx = _probe(owner, surgery, names, index)
    scale = {}
    if any(v.numel() and (v - torch.round(v)).abs().max() > 1e-6
           for v in idx.values()):
        scale = _probe(owner, surgery, names,
                       lambda k, p: torch.ones_like(p, dtype=torch.float64))
    maps = {}
    for name, v in idx.items():
        maps[name] = None
        s = scale.get(name)
        if v.numel() == 0 or (s is not None and (s == 0).any()):
            continue
        g = torch.round(v / s if s is not None else v)
        if (g - (v / s if s is not None else v)).abs().max() > 1e-2:
            continue
        g = g.cpu().numpy().astype(np.int64)
        k = np.searchsorted(starts, g, side='right') - 1
        if g.min() < 0 or g.max() >= sizes.sum() or (k != k[0]).any():
            continue
        unit = s is None or bool(((s - 1).abs() < 1e-12).all())
        maps[name] = ParamMap(order[k[0]],
                              torch.as_tensor(g - starts[k[0]]),
                              None if unit else s.float())
    return maps


def _check_map(new: torch.Tensor, old: torch.Tensor, m: ParamMap) -> bool:
    """The map reproduces the real new parameter from the real old one."""
    want = m.take(old, new.shape)
    return want.shape == new.shape and torch.allclose(
        want.float(), new.detach().float(), rtol=1e-5, atol=1e-7)


class Replacement:
    """Old parameter -> its new parameters (with their maps), after an
    in-place shrink."""

    def __init__(self):
        self.new_of: Dict[int, List[Tuple[nn.Parameter,
                                          Optional[ParamMap]]]] = {}
        self.unmapped: List[str] = []


def shrink_student(owner: nn.Module, surgery: Callable[[nn.Module], None],
                   prefix: str = '',
                   optimizers: Sequence[torch.optim.Optimizer] = (),
                   averaged: Sequence[nn.Module] = (),
                   log: Callable[[str], None] = print) -> Replacement:
    """Apply ``surgery`` (which prunes the student at ``prefix`` in place,
    and whatever follows it, e.g. a distiller's connectors) to ``owner``,
    with the gradients, the state and param groups of ``optimizers``, and
    to the copies inside ``averaged`` models (mmengine EMA models: their
    ``module`` has ``owner``'s structure).

    Returns the :class:`Replacement` (old parameter id -> new parameters).
    """
    maps = param_maps(owner, surgery, prefix)
    before = dict(owner.named_parameters())
    surgery(owner)
    rep = Replacement()
    after = dict(owner.named_parameters())
    old_ids = {id(p) for p in before.values()}
    for name, q in after.items():
        if id(q) in old_ids:
            continue  # surgery left it as it was
        m = maps.get(name)
        if m is not None and not _check_map(q, before[m.source], m):
            m = None
        if m is None:
            rep.unmapped.append(name)
            continue
        old = before[m.source]
        rep.new_of.setdefault(id(old), []).append((q, m))
        if old.grad is not None:  # (an open accumulation window)
            q.grad = m.take(old.grad, q.shape, power=-1)
    for opt in optimizers:
        _remap_optimizer(opt, rep, before, after, log)
    for model in averaged:
        _shrink_averaged(model, surgery)
    if rep.unmapped:
        log('CPD: the entries of ' + ', '.join(rep.unmapped[:6]) +
            (' ...' if len(rep.unmapped) > 6 else '') + ' are not a '
            'selection of one old parameter: their optimizer state starts '
            'anew')
    return rep


def _remap_optimizer(opt, rep, before, after, log):
    """Replace old parameters by their new ones in every param group (a
    group keeps its lr/decay multipliers) and slice their state alike."""
    current = {id(q) for q in after.values()}
    old_name = {id(p): n for n, p in before.items()}
    fresh = defaultdict(list)  # module path -> new untraced parameters
    for n in rep.unmapped:
        fresh[n.rpartition('.')[0]].append(after[n])
    placed = set()
    for group in opt.param_groups:
        params = []
        for p in group['params']:
            if id(p) in current or id(p) not in old_name:
                params.append(p)  # untouched, or not the student's
                continue
            state = opt.state.pop(p, None)
            path = old_name[id(p)].rpartition('.')[0]
            news = list(rep.new_of.get(id(p), [])) + \
                [(q, None) for q in fresh.pop(path, [])]
            for q, m in news:
                if id(q) in placed:
                    continue
                placed.add(id(q))
                params.append(q)
                if state and m is not None:
                    new_state = _slice_state(state, p, q, m, log)
                    if new_state is not None:
                        opt.state[q] = new_state
        group['params'] = params


def _slice_state(state, p, q, m, log):
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim():
            power = GRADIENT_STATE.get(k)
            if m.scale is not None and power is None:
                log(f'CPD: optimizer state {k!r} of a rescaled parameter '
                    'has no known scaling: it starts anew')
                return None
            out[k] = m.take(v, q.shape, power=power or 0).to(v.dtype)
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _shrink_averaged(model: nn.Module, surgery) -> None:
    """Apply the surgery to an averaged copy (mmengine
    ``BaseAveragedModel``: the copy is ``model.module``) and rebuild the
    tensors it averages."""
    inner = getattr(model, 'module', model)
    surgery(inner)
    inner.requires_grad_(False)
    if hasattr(model, 'avg_parameters'):
        model.avg_parameters = inner.state_dict() if getattr(
            model, 'update_buffers', False) else \
            dict(inner.named_parameters())


def map_channels(base, kept: np.ndarray, current) -> np.ndarray:
    """Channel of ``base`` (the comb of the original model) behind every
    channel of ``current`` (the comb of the model pruned to ``kept``):
    every module record's atoms that survive the surgery, in order, are
    the new record's atoms.

    Raises:
        ValueError: a channel maps to none or to several (the two combs do
            not describe one model before and after the surgery).
    """
    keep = base.keep_fn(kept)
    to_base = np.full(current.num_channels, -1, dtype=np.int64)
    clash = []
    for name, rec in current.records.items():
        old = base.records.get(name)
        if old is None:
            continue
        new_arrays, old_arrays = rec.atom_arrays(), old.atom_arrays()
        for key, b in new_arrays.items():
            a = old_arrays.get(key)
            if a is None:
                continue
            a = np.broadcast_to(a, a.shape)
            survived = a[keep(a)]
            if survived.size != b.size:
                continue
            cb, ca = current.channels(b.ravel()), base.channels(survived)
            ok = (cb >= 0) & (ca >= 0)
            cb, ca = cb[ok], ca[ok]
            seen = to_base[cb]
            bad = (seen >= 0) & (seen != ca)
            if bad.any():
                clash.append(name)
            to_base[cb] = ca
    missing = np.nonzero(to_base < 0)[0]
    if clash or missing.size or np.unique(to_base).size != to_base.size:
        raise ValueError(
            f'the channels of the shrunk model do not map one to one onto '
            f'the original ones ({missing.size} unmapped, conflicting in '
            f'{clash[:3]})')
    if not kept[to_base].all():
        raise ValueError('a removed channel is still in the shrunk model')
    return to_base


def rewrap_ddp(wrapper: nn.Module) -> nn.Module:
    """A new DDP wrapper (the same class and settings, e.g. mmengine's
    ``MMDistributedDataParallel`` with its ``find_unused_parameters``) of
    ``wrapper.module``, whose parameters a shrink replaced; every rank
    must call it at the same point (DDP's constructor is collective)."""
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(wrapper, DistributedDataParallel):
        raise TypeError(f'cannot rebuild a {type(wrapper).__name__} after a '
                        'shrink (only DistributedDataParallel wrappers)')
    kwargs = dict(device_ids=wrapper.device_ids,
                  output_device=wrapper.output_device, dim=wrapper.dim,
                  broadcast_buffers=wrapper.broadcast_buffers,
                  find_unused_parameters=wrapper.find_unused_parameters,
                  gradient_as_bucket_view=wrapper.gradient_as_bucket_view,
                  process_group=wrapper.process_group,
                  bucket_cap_mb=wrapper.bucket_bytes_cap / (1024 * 1024))
    if hasattr(wrapper, 'detect_anomalous_params'):  # mmengine's
        kwargs['detect_anomalous_params'] = wrapper.detect_anomalous_params
    return type(wrapper)(module=wrapper.module, **kwargs)
