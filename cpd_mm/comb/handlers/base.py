"""The handler contract: one class per module type with its own channel
algebra, owning its trace rule, gate parameters, cost and surgery.

A handler is registered for module types with :func:`register_handler`;
:func:`handler_for` finds it through the module's MRO, so subclasses
(mmcv/mmengine wrappers of ``nn.Conv2d``, ``nn.Linear`` ...) are handled too.
Comb's self-verification catches a subclass whose forward breaks the rule
and freezes its channels.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..space import TensorInfo, along, channel_axis

__all__ = ['ModuleRecord', 'CostTerm', 'ModuleHandler', 'register_handler',
           'handler_for', 'keep_param', 'input_atoms', 'HANDLERS']


@dataclass
class ModuleRecord:
    """What a handler stores about one traced module (all its calls).

    Subclasses add their fields; ``atom_fields`` lists the fields holding
    atoms, which are united when a shared module is called again.
    """
    name: str
    atom_fields = ()

    def merge(self, tr, **atoms) -> None:
        """Unite ``atoms`` with the stored ones (first call stores them)."""
        for key, value in atoms.items():
            old = getattr(self, key, None)
            if old is None:
                setattr(self, key, value)
            else:
                tr.uf.union(old, value)

    def atom_arrays(self) -> Dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in self.atom_fields
                if getattr(self, k, None) is not None}


@dataclass
class CostTerm:
    """``coef * prod(count(f) for f in factors)`` of the deployed model.

    ``count(f)`` is the number of entries of the atom array ``f`` whose
    channel is kept (entries without a channel always count). ``metric``
    is 'params' or 'flops' (multiply-accumulates at the traced size).
    """
    metric: str
    coef: float
    factors: Tuple[np.ndarray, ...]


class ModuleHandler:
    """Base class. Subclasses set ``module_types`` and implement the parts
    that apply to them.

    Attributes:
        transparent: if True the tracer records the module's own aten ops
            (the handler only adds surgery and gating on top, e.g. norms);
            otherwise its inner ops are hidden and :meth:`trace` maps input
            channels to output channels.
    """
    module_types: Sequence[type] = ()
    transparent = False

    def trace(self, tr, name: str, module: nn.Module, args, kwargs,
              out) -> TensorInfo:
        """Record one call; return the channel annotation of ``out``."""
        raise NotImplementedError

    def site_parameters(self, module: nn.Module,
                        record: ModuleRecord) -> List[Tuple[str, int]]:
        """``(parameter name, axis)`` of the module's parameters that are
        homogeneous of degree one in each output channel (weight rows and
        bias of a conv, norm affine): for them Σ θ·∂L/∂θ equals the gradient
        of a gate on that output channel. Empty: score from activations."""
        return []

    def internal_gates(self, module: nn.Module, record: ModuleRecord
                       ) -> List[Tuple[str, int, np.ndarray]]:
        """``(parameter name, axis, atoms)`` for channels gated inside the
        module (not at its output), e.g. attention's inner widths."""
        return []

    def gate_forward(self, module: nn.Module, record: ModuleRecord,
                     mask_of: Callable) -> Optional[Callable]:
        """A forward for the gated model when gating needs more than a mask
        on the module's output; ``mask_of(atoms)`` gives the mask entries
        (on the module's device). None: output gating suffices."""
        return None

    def cost_terms(self, module: nn.Module,
                   record: ModuleRecord) -> List[CostTerm]:
        """Parameters and FLOPs of the module as products of channel
        counts. Parameters not covered here are counted as fixed."""
        return []

    def prune(self, module: nn.Module, record: ModuleRecord,
              keep: Callable) -> Optional[nn.Module]:
        """Slice the module in place; ``keep(atoms)`` is a bool mask. Return
        a replacement module if the module must be swapped, else None."""
        return None


HANDLERS: Dict[type, ModuleHandler] = {}


def register_handler(cls):
    """Class decorator: one instance serves every type in ``module_types``."""
    inst = cls()
    for t in cls.module_types:
        HANDLERS[t] = inst
    return cls


def handler_for(module: nn.Module) -> Optional[ModuleHandler]:
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h
    return None


# ------------------------------------------------------------- helpers
def keep_param(module: nn.Module, pname: str, axis: int,
               keep: np.ndarray) -> None:
    """Keep entries ``keep`` (bool mask) of ``module.<pname>`` along
    ``axis``; parameters stay parameters (same requires_grad), buffers stay
    buffers."""
    p = getattr(module, pname, None)
    if p is None:
        return
    idx = torch.as_tensor(np.nonzero(keep)[0], device=p.device)
    new = torch.index_select(p.data, axis, idx)  # a new tensor
    if isinstance(p, nn.Parameter):
        setattr(module, pname, nn.Parameter(new,
                                            requires_grad=p.requires_grad))
    else:
        setattr(module, pname, new)


def input_atoms(tr, name: str, info: TensorInfo, axis: int,
                size: int) -> np.ndarray:
    """Atoms a consumer reads along ``axis``; freeze if channels lie
    elsewhere (the consumer would mix them with positions) or if removed
    channels are not zero where the consumer sums them."""
    cls = tr.uf.find(info.ids)
    ch = channel_axis(cls)
    if ch is not None and ch != axis % info.ids.ndim:
        tr.freeze(info.ids, f'{name} reads channels on another axis')
        return np.full(size, -1, dtype=np.int64)
    if info.has_ids and not info.z:
        tr.freeze(info.ids, f'channels reach {name} through an op that does '
                  'not keep removed channels at zero')
    return along(info.ids, axis, size)


def first_tensor(args, kwargs):
    if args:
        return args[0]
    return next(iter(kwargs.values()))
