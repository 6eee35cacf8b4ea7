"""Aten-level channel rules, one table (:data:`RULES`) filled by the
modules below: elementwise and reductions, spatial ops, views/indexing/
joins, attention products, normalisations."""
from .table import NO_CHANNEL_OPS, RULES, STOP_OPS
from . import elementwise, spatial, views, attention, norm  # noqa: F401

__all__ = ['RULES', 'NO_CHANNEL_OPS', 'STOP_OPS']
