"""Handlers: one class per construct with its own channel algebra, a module
type (:class:`~cpd_mm.comb.handlers.base.ModuleHandler`) or a family of aten
ops that no module owns (:class:`~cpd_mm.comb.handlers.base.OpHandler`).
Adding a construct is one file here, imported below, plus its equivalence
test."""
from .base import (HANDLERS, OP_HANDLERS, CostTerm, GatePatch, LatencyKind,
                   ModuleHandler, ModuleRecord, OpHandler, TimedLayer,
                   handler_for, keep_param, op_handler_for, op_handlers,
                   register_handler, register_op_handler)
from . import (conv, linear, norm, attention, roi, sdpa,  # noqa: F401
               std_conv)
from .attention import PrunedMultiheadAttention

__all__ = ['HANDLERS', 'OP_HANDLERS', 'CostTerm', 'GatePatch', 'LatencyKind',
           'ModuleHandler', 'ModuleRecord', 'OpHandler', 'TimedLayer',
           'handler_for', 'keep_param', 'op_handler_for', 'op_handlers',
           'register_handler', 'register_op_handler',
           'PrunedMultiheadAttention']
