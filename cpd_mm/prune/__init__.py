"""Prune: gates, importance, schedule, hook, surgery, plans."""
from .cost import CostModel
from .gates import ChannelGates
from .hook import CPDPruningHook
from .importance import IMPORTANCE_TYPES, ImportanceAccumulator
from .plan import (PLAN_META_KEY, PlanMismatchError, apply_plan, load_plan,
                   make_plan, save_plan)
from .schedule import select_channels
from .surgery import prune_model

__all__ = [
    'ChannelGates', 'CostModel', 'CPDPruningHook', 'IMPORTANCE_TYPES',
    'ImportanceAccumulator', 'PLAN_META_KEY', 'PlanMismatchError',
    'apply_plan', 'load_plan', 'make_plan', 'save_plan', 'select_channels',
    'prune_model'
]
