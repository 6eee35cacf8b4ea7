"""The handler contracts: one class per construct with its own channel
algebra, owning its trace rule, gate parameters, cost and surgery.

A construct is a module type (:class:`ModuleHandler`, registered for module
types with :func:`register_handler`; :func:`handler_for` finds it through
the module's MRO, so subclasses such as mmcv/mmengine wrappers of
``nn.Conv2d`` are handled too) or a family of aten ops with state-like
meaning that no module owns (:class:`OpHandler`, registered for op names
with :func:`register_op_handler`: normalisation statistics, fused
attention). Comb's self-verification catches a subclass whose forward
breaks the rule and freezes its channels.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..space import TensorInfo, along, channel_axis

__all__ = ['ModuleRecord', 'CostTerm', 'ModuleHandler', 'register_handler',
           'handler_for', 'keep_param', 'input_atoms', 'HANDLERS',
           'OpHandler', 'GatePatch', 'TimedLayer', 'LatencyKind',
           'register_op_handler',
           'op_handler_for', 'op_handlers', 'OP_HANDLERS']


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


@dataclass
class TimedLayer:
    """A layer that the latency table times: ``table.<lookup>(key,
    *fixed, *counts)`` where ``counts`` are the kept entries of each atom
    array in ``widths`` (as for :class:`CostTerm` factors)."""
    key: str
    widths: List[np.ndarray]
    fixed: Tuple[int, ...] = ()
    lookup: str = 'layer'


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

    def absorbs_input_gate(self, module: nn.Module) -> bool:
        """True if a gate on the module's input is redundant when the
        module is its only reader (a BatchNorm: its own output is gated)."""
        return False

    def cost_terms(self, module: nn.Module,
                   record: ModuleRecord) -> List[CostTerm]:
        """Parameters and FLOPs of the module as products of channel
        counts. Parameters not covered here are counted as fixed."""
        return []

    def latency_widths(self, module: nn.Module, record: ModuleRecord
                       ) -> Optional[List[np.ndarray]]:
        """Atom arrays whose kept counts are the module's widths in the
        latency table's API (``(cin, cout)``, a depthwise conv ``(c, )``);
        None: the table does not time this module."""
        return None

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


@dataclass
class GatePatch:
    """A forward that gates inside ``module`` (e.g. statistics over active
    channels only), installed while some channel of ``atoms`` is removed.

    ``make()`` returns the forward (a function of ``self_``, args, kwargs);
    ``update(kept, device)`` is called on every mask change with the kept
    flags per channel plus a trailing True (index -1: no channel).
    Probing gradients leaves these patches as the mask has them."""
    module: str
    atoms: List[np.ndarray]
    make: Callable
    update: Callable


class LatencyKind:
    """How the latency table times one kind of layer that an op handler
    owns. A *spec* is a plain dict (``spec['kind'] == kind``) fixing all
    but the widths pruning changes (see :mod:`cpd_mm.deploy.layer_specs`).

    Attributes:
        kind: the spec kind and the key of the found calls in
            :func:`~cpd_mm.deploy.layer_specs.discover_layers`' result.
        function: the torch function whose calls are such layers.
    """
    kind = ''
    function: Optional[Callable] = None

    def spec(self, args, kwargs) -> dict:
        """The spec of one call of :attr:`function`."""
        raise NotImplementedError

    def widths_of(self, spec: dict) -> tuple:
        """Full widths, in the order of :meth:`axes` and of the table's
        lookup (:attr:`TimedLayer.lookup`)."""
        raise NotImplementedError

    def axes(self, spec: dict, sample: Callable, samples: int,
             block: int) -> List[List[int]]:
        """Sampled widths per axis; ``sample(full, unit, samples, block)``
        is :func:`~cpd_mm.deploy.layer_specs.sample_widths`."""
        raise NotImplementedError

    def build(self, spec: dict, widths: Sequence[int]):
        """``(module, [inputs])`` computing the layer at ``widths``."""
        raise NotImplementedError

    def output_size(self, spec: dict, widths: Sequence[int]) -> int:
        """Elements of the layer's output at ``widths``."""
        raise NotImplementedError


class OpHandler:
    """Base class of a construct that reaches the dispatcher as aten ops
    (``ops``, overload packet names) not hidden inside a handled module.

    :meth:`trace` is its rule (as in :mod:`cpd_mm.comb.rules`); it stores
    typed records with ``tr.add_op_record(self, record)``, which comb keeps
    in ``comb.op_records[self.key]`` in trace order. The other methods read
    them (``records``) to gate, annotate groups, time and prune.

    Attributes:
        absorbing_ops: ops (``'aten.<name>'``) that, like a module whose
            handler :meth:`~ModuleHandler.absorbs_input_gate`, make a gate on
            their input redundant.
        latency: how the latency table times the construct, or None.
    """
    key = ''
    ops: Sequence[str] = ()
    absorbing_ops: Sequence[str] = ()
    latency: Optional[LatencyKind] = None

    def trace(self, tr, args, kwargs, out):
        """The op's rule: the :class:`TensorInfo` of its output(s)."""
        raise NotImplementedError

    def annotate_groups(self, comb, records: list) -> None:
        """Adjust group descriptions (e.g. granularity) after grouping."""

    def gate_patches(self, modules: Dict[str, nn.Module], comb,
                     records: list, calls) -> List[GatePatch]:
        """Forwards the gated model needs; ``calls`` is a counter dict that
        the gates clear at the start of every pass."""
        return []

    def latency_layers(self, comb, records: list, table
                       ) -> List[TimedLayer]:
        """The layers of this construct that ``table`` times."""
        return []

    def prune(self, model: nn.Module, comb, records: list, keep) -> None:
        """Surgery before modules are sliced (``keep`` as for modules)."""


OP_HANDLERS: Dict[str, OpHandler] = {}


def register_op_handler(cls):
    """Class decorator: one instance serves every op in ``ops``."""
    inst = cls()
    for op in cls.ops:
        OP_HANDLERS[op] = inst
    return cls


def op_handler_for(op_name: str) -> Optional[OpHandler]:
    return OP_HANDLERS.get(op_name)


def op_handlers() -> List[OpHandler]:
    """Every registered op handler once, in registration order."""
    return list({id(h): h for h in OP_HANDLERS.values()}.values())


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
