"""Generic aten-level channel rules, one table (:data:`RULES`) filled by
the modules below: elementwise and reductions, spatial ops, views/indexing/
joins, products of activations. Ops of a construct with its own meaning
(normalisation statistics, fused attention) belong to its op handler in
:mod:`cpd_mm.comb.handlers`."""
from .table import NO_CHANNEL_OPS, RULES, STOP_OPS
from . import elementwise, spatial, views, matmul  # noqa: F401

__all__ = ['RULES', 'NO_CHANNEL_OPS', 'STOP_OPS']
