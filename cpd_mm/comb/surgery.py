"""Surgery: turn a model plus a keep-mask into a smaller dense model.

Op handlers do their surgery first (fused attention folds its original
scale into q when head dims shrink), every handled module is sliced by its
handler (or swapped for a drop-in), passengers are sliced, and module
attributes that the model's own forward code
uses to reshape (``head_dims``, ``num_channels`` ...) are updated, so that
forward runs unchanged on the smaller model.
"""
import copy
import functools
import inspect
import re

import numpy as np
import torch.nn as nn

from .groups import CombResult
from .handlers import handler_for, keep_param, op_handlers


def _owner(model, path):
    mod_path, _, attr = path.rpartition('.')
    mod = model.get_submodule(mod_path) if mod_path else model
    return mod, attr


# shape arguments of reshaping calls (one level of nested parentheses)
_SHAPE_CALL = re.compile(r'\b(?:reshape|view|unflatten|expand|split|'
                         r'split_with_sizes|new_zeros|new_empty|new_full|'
                         r'new_ones|zeros|empty|full|ones)\('
                         r'(?:[^()]|\([^()]*\))*\)')


def _forward_source(module):
    """The reshaping calls in the module's class source (forward and its
    helper methods): only attributes used there are shape arguments."""
    return _shape_calls(type(module))


@functools.lru_cache(maxsize=None)
def _shape_calls(cls):
    """Shape arguments in the class and its bases up to ``nn.Module`` (a
    forward may be inherited). Reading a class's source parses its whole
    file: once per class."""
    calls = []
    for c in cls.__mro__:
        if c in (nn.Module, object) or c.__module__.startswith('torch.'):
            continue
        try:
            calls += _SHAPE_CALL.findall(inspect.getsource(c))
        except (OSError, TypeError):
            pass
    return '\n'.join(calls)


def _record_channels(comb):
    """Module name -> the channels its record reads or writes. Records are
    fixed once traced: computed once per comb, not once per surgery
    (verification prunes a copy per check)."""
    cached = getattr(comb, '_record_channels_cache', None)
    if cached is None or cached[0] is not comb.records:
        chans = {name: np.unique(np.concatenate(
            [comb.channels(a).ravel() for a in rec.atom_arrays().values()]
            or [np.zeros(0, np.int64)]))
            for name, rec in comb.records.items()}
        cached = comb._record_channels_cache = (comb.records, chans)
    return cached[1]


def _owners(comb, module, atoms, rec_chans):
    """``module`` and its descendants that own some of ``atoms``' channels
    (a record inside them reads or writes them): where a shape argument
    such as ``block.out_channels`` may live."""
    chans = np.unique(comb.channels(atoms))
    prefix = module + '.' if module else ''
    owners = {module}
    for name, rc in rec_chans.items():
        if name.startswith(prefix) and np.isin(rc, chans).any():
            parts = name[len(prefix):].split('.')
            owners |= {prefix + '.'.join(parts[:i])
                       for i in range(1, len(parts) + 1)}
    return sorted(owners)


def _update_view_attributes(model, comb, keep):
    """Reshape targets and split sizes read from module attributes must
    follow the pruning: integer attributes equal to the old size, of the
    module that reshapes or of a descendant owning those channels, whose
    name appears in a shape argument of the reshaping module's code."""
    changes, rec_chans = {}, None
    for v in comb.views:
        new = int(keep(v.atoms).sum())
        if new == v.size:
            continue
        m = model.get_submodule(v.module) if v.module else model
        src = _forward_source(m)
        if rec_chans is None:
            rec_chans = _record_channels(comb)
        for owner in _owners(comb, v.module, v.atoms, rec_chans):
            om = model.get_submodule(owner) if owner else model
            for k, val in vars(om).items():
                if type(val) is not int or val != v.size or \
                        not re.search(r'\.%s\b' % re.escape(k), src):
                    continue
                key = (owner, k)
                if changes.get(key, new) != new:
                    raise RuntimeError(
                        f'{owner}.{k} would need two sizes '
                        f'({changes[key]} and {new}) after pruning')
                changes[key] = new
    for sp in comb.split_sizes:
        new = [int(keep(a).sum()) for a in sp.parts]
        if new == sp.sizes:
            continue
        m = model.get_submodule(sp.module) if sp.module else model
        src = _forward_source(m)
        for k, val in vars(m).items():
            if isinstance(val, (list, tuple)) and list(val) == sp.sizes \
                    and re.search(r'\.%s\b' % re.escape(k), src):
                changes[(sp.module, k)] = type(val)(new)
    for (mod, k), new in changes.items():
        m = model.get_submodule(mod) if mod else model
        setattr(m, k, new)
    return changes


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose modules are new but whose parameters,
    buffers and other attributes are the original objects: enough to prune
    it (surgery replaces what it changes and never writes into a tensor it
    did not create), without copying the weights."""
    # a module-level recursion: a nested one refers to itself, and that
    # cycle would hold every copy (through the memo) until the garbage
    # collector runs
    return _clone_module(model, {})


def _clone_module(m, memo):
    """``m`` with new module objects; ``memo``: id(original) -> copy, so a
    module shared by two parents stays shared."""
    new = memo.get(id(m))
    if new is None:
        new = memo[id(m)] = copy.copy(m)  # a new __dict__, the same values
        new._parameters = m._parameters.copy()
        new._buffers = m._buffers.copy()
        new._modules = type(m._modules)(
            (k, None if v is None else _clone_module(v, memo))
            for k, v in m._modules.items())
    return new


def _set_submodule(model, name, new):
    parent, _, attr = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def prune_model(model: nn.Module, comb: CombResult,
                kept: np.ndarray) -> nn.Module:
    """Physically remove channels whose ``kept`` entry is False (in place).

    Args:
        model: the model ``comb`` was computed on (not yet pruned).
        comb: its :class:`CombResult`.
        kept: bool array over ``comb.num_channels``.
    Returns:
        The same model object, smaller.
    """
    kept = np.asarray(kept, dtype=bool)
    if kept.shape != (comb.num_channels, ):
        raise ValueError(f'kept mask has shape {kept.shape}, expected '
                         f'({comb.num_channels},)')
    if (~kept & comb.frozen_channels).any():
        raise ValueError('the keep-mask removes frozen channels')
    for g in comb.groups:
        if not kept[g.channels].any():
            raise ValueError(f'group {g.name!r} would lose all its channels')
    keep = comb.keep_fn(kept)
    for h in op_handlers():
        h.prune(model, comb, comb.op_records.get(h.key, []), keep)
    modules = dict(model.named_modules())
    for name, rec in comb.records.items():
        m = modules[name]
        new = handler_for(m).prune(m, rec, keep)
        if new is not None:
            _set_submodule(model, name, new)
    done = {}
    for ps in comb.passengers:
        mask = keep(ps.atoms)
        key = (ps.name, ps.axis)
        if key in done:
            if not np.array_equal(done[key], mask):
                raise RuntimeError(f'passenger {ps.name} is indexed by '
                                   'two different channel sets')
            continue
        done[key] = mask
    for (pname, axis), mask in done.items():
        if mask.all():
            continue
        mod, attr = _owner(model, pname)
        keep_param(mod, attr, axis, mask)
    _update_view_attributes(model, comb, keep)
    return model
