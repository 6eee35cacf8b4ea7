"""Prune: importance, schedule, hook, plans (gates and surgery belong to the
handlers in :mod:`cpd_mm.comb`, re-exported here)."""
from ..comb.gates import ChannelGates
from ..comb.surgery import prune_model
from .cost import CostModel
from .hook import CPDPruningHook
from .importance import IMPORTANCE_TYPES, ImportanceAccumulator
from .plan import (PLAN_META_KEY, PlanMismatchError, apply_plan, load_plan,
                   make_plan, save_plan)
from .schedule import select_channels

__all__ = [
    'ChannelGates', 'CostModel', 'CPDPruningHook', 'IMPORTANCE_TYPES',
    'ImportanceAccumulator', 'PLAN_META_KEY', 'PlanMismatchError',
    'apply_plan', 'load_plan', 'make_plan', 'save_plan', 'select_channels',
    'prune_model'
]
