"""Load pruned checkpoints into a runner built from the original config.

Two kinds of checkpoints carry a plan:

* physically pruned ones (``pruned_final.pth``; the plan is in
  ``meta['cpd_plan']``): the model is pruned to the plan, then the (smaller)
  weights are loaded;
* ordinary runner checkpoints of a pruning run (full-size, gated weights;
  the plan is in ``checkpoint['cpd_pruning']['plan']``): the weights are
  loaded, then the model is pruned, which gives the same function as the
  gated model.
"""
from typing import Optional

from mmengine.model import is_model_wrapper
from mmengine.runner.checkpoint import _load_checkpoint

from .hook import STATE_KEY
from .plan import PLAN_META_KEY, PlanMismatchError, apply_plan


def checkpoint_plan(checkpoint: dict):
    """``(plan, kind)`` with kind 'pruned' or 'gated', or ``(None, None)``."""
    meta = checkpoint.get('meta') or {}
    if isinstance(meta, dict) and meta.get(PLAN_META_KEY):
        return meta[PLAN_META_KEY], 'pruned'
    state = checkpoint.get(STATE_KEY)
    if isinstance(state, dict) and state.get('plan', {}).get('groups'):
        return state['plan'], 'gated'
    return None, None


def _strip(state_dict):
    from ..distill.checkpoint import student_state_dict
    return student_state_dict({'state_dict': state_dict})


def _load_strict(model, state_dict, path):
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PlanMismatchError(
            f'checkpoint {path} does not match the pruned model: missing '
            f'{result.missing_keys[:5]}, unexpected '
            f'{result.unexpected_keys[:5]}')


def load_into_runner(runner, path: str, checkpoint: Optional[dict] = None,
                     training: bool = False) -> bool:
    """Prune ``runner.model`` to the plan of ``path`` and load its weights.

    Returns False (and does nothing) for checkpoints without a plan, so the
    runner loads them as usual. With a distillation wrapper, evaluation uses
    the student alone; training (``training=True``) also prunes a 'self'
    teacher to the plan and gives it the same weights.
    """
    if checkpoint is None:
        checkpoint = _load_checkpoint(path, map_location='cpu')
    plan, kind = checkpoint_plan(checkpoint)
    if plan is None:
        return False
    model = runner.model.module if is_model_wrapper(runner.model) \
        else runner.model
    student = getattr(model, 'student', None)
    state = checkpoint.get('state_dict', checkpoint)
    if kind == 'pruned':
        target = student if student is not None else model
        apply_plan(target, plan)
        _load_strict(target, _strip(state), path)
    else:
        if student is not None:
            _load_strict(student, _strip(state), path)
            target = student
        else:
            _load_strict(model, state, path)
            target = model
        apply_plan(target, plan)
    if student is not None and training and \
            getattr(model, 'teacher_is_self', False):
        apply_plan(model.teacher, plan)
        model.sync_teacher()
    elif student is not None and not is_model_wrapper(runner.model):
        runner.model = student
    runner._has_loaded = True
    runner.logger.info(f'CPD: loaded {kind} checkpoint {path} '
                       f'({sum(p.numel() for p in target.parameters()) / 1e6:.3f}'
                       ' M params)')
    return True
