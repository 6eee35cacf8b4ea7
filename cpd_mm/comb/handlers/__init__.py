"""Module handlers: one class per module type with its own channel algebra
(see :class:`~cpd_mm.comb.handlers.base.ModuleHandler`). Adding a construct
is one file here, imported below, plus its equivalence test."""
from .base import (HANDLERS, CostTerm, ModuleHandler, ModuleRecord,
                   handler_for, keep_param, register_handler)
from . import conv, linear, norm, attention, roi, std_conv  # noqa: F401
from .attention import PrunedMultiheadAttention

__all__ = ['HANDLERS', 'CostTerm', 'ModuleHandler', 'ModuleRecord',
           'handler_for', 'keep_param', 'register_handler',
           'PrunedMultiheadAttention']
