"""Surgery: turn a model plus a keep-mask into a smaller dense model.

Every handled module is sliced by its handler (or swapped for a drop-in),
passengers are sliced, the original attention scale is folded into q when
head dims shrink, and module attributes that the model's own forward code
uses to reshape (``head_dims``, ``num_channels`` ...) are updated, so that
forward runs unchanged on the smaller model.
"""
import inspect
import math
import re

import numpy as np
import torch
import torch.nn as nn

from .groups import CombResult
from .handlers import handler_for, keep_param
from .space import along


def _owner(model, path):
    mod_path, _, attr = path.rpartition('.')
    mod = model.get_submodule(mod_path) if mod_path else model
    return mod, attr


def _fold_attention_scales(model, comb, keep):
    """Scaled-dot-product attention without an explicit scale derives
    1/sqrt(head_dim) from q; keep the original by scaling q's producer."""
    for s in comb.attention_scales:
        d = s.head_dim
        new_d = int(keep(along(s.q_ids, -1, d)).sum())
        if new_d == d or not s.producer:
            continue
        m = model.get_submodule(s.producer)
        rec = comb.records[s.producer]
        q_atoms = np.unique(s.q_ids[s.q_ids >= 0])
        rows = torch.as_tensor(np.nonzero(np.isin(rec.outputs, q_atoms))[0],
                               device=m.weight.device)
        f = math.sqrt(new_d / d)
        with torch.no_grad():
            m.weight[rows] *= f
            if getattr(m, 'bias', None) is not None:
                m.bias[rows] *= f


# shape arguments of reshaping calls (one level of nested parentheses)
_SHAPE_CALL = re.compile(r'\b(?:reshape|view|unflatten|expand|split|'
                         r'split_with_sizes|new_zeros|new_empty|new_full|'
                         r'new_ones|zeros|empty|full|ones)\('
                         r'(?:[^()]|\([^()]*\))*\)')


def _forward_source(module):
    """The reshaping calls in the module's class source (forward and its
    helper methods): only attributes used there are shape arguments."""
    try:
        src = inspect.getsource(type(module))
    except (OSError, TypeError):
        return ''
    return '\n'.join(_SHAPE_CALL.findall(src))


def _owners(model, comb, module, atoms):
    """``module`` and its descendants that own some of ``atoms``' channels
    (a record inside them reads or writes them): where a shape argument
    such as ``block.out_channels`` may live."""
    chans = set(comb.channels(atoms).ravel().tolist()) - {-1}
    prefix = module + '.' if module else ''
    owners = {module}
    for name, rec in comb.records.items():
        if name.startswith(prefix) and any(
                chans & set(comb.channels(a).ravel().tolist())
                for a in rec.atom_arrays().values()):
            parts = name[len(prefix):].split('.')
            owners |= {prefix + '.'.join(parts[:i])
                       for i in range(1, len(parts) + 1)}
    return sorted(owners)


def _update_view_attributes(model, comb, keep):
    """Reshape targets and split sizes read from module attributes must
    follow the pruning: integer attributes equal to the old size, of the
    module that reshapes or of a descendant owning those channels, whose
    name appears in a shape argument of the reshaping module's code."""
    changes = {}
    for v in comb.views:
        new = int(keep(v.atoms).sum())
        if new == v.size:
            continue
        m = model.get_submodule(v.module) if v.module else model
        src = _forward_source(m)
        for owner in _owners(model, comb, v.module, v.atoms):
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
    _fold_attention_scales(model, comb, keep)
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
