"""Prune: importance, schedule, hook, plans (gates and surgery belong to the
handlers in :mod:`cpd_mm.comb`, re-exported here)."""
from ..comb.gates import ChannelGates
from ..comb.surgery import prune_model
from .cost import CostModel
from .hook import CPDPruningHook
from .importance import IMPORTANCE_TYPES, ImportanceAccumulator
from .loading import CPDRunner, apply_checkpoint_plan, checkpoint_plan
from .plan import (PLAN_META_KEY, PlanMismatchError, apply_plan, load_plan,
                   make_plan, save_plan)
from .schedule import select_channels
from .session import PruningSession, TrainingState

__all__ = [
    'ChannelGates', 'CostModel', 'CPDPruningHook', 'CPDRunner',
    'IMPORTANCE_TYPES', 'apply_checkpoint_plan', 'checkpoint_plan',
    'ImportanceAccumulator', 'PLAN_META_KEY', 'PlanMismatchError',
    'apply_plan', 'load_plan', 'make_plan', 'save_plan', 'select_channels',
    'prune_model', 'PruningSession', 'TrainingState'
]
