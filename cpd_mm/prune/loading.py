"""Load pruned checkpoints into models built from the original config.

Two kinds of checkpoints carry a plan:

* physically pruned ones (``pruned_final.pth``, and every checkpoint that
  :class:`CPDRunner` writes while fine-tuning one; the plan is in
  ``meta['cpd_plan']``): the model is pruned to the plan, then the (smaller)
  weights are loaded;
* ordinary runner checkpoints of a pruning run (full-size, gated weights;
  the plan is in ``checkpoint['cpd_pruning']['plan']``): the weights are
  loaded, then the model is pruned, which gives the same function as the
  gated model;
* runner checkpoints of a pruning run written after the student was
  shrunk (``checkpoint['cpd_pruning']['physical']``): the student is pruned
  to the plan, then its weights are loaded; a distiller's connectors follow
  the student, its teacher keeps its size when a run resumes.

The model must change shape before mmengine wraps it for distributed
training (``MMDistributedDataParallel`` keeps the parameters it was given),
so :class:`CPDRunner` does it in ``build_model``, which ``Runner.__init__``
calls right before ``wrap_model``.
"""
from typing import Optional, Tuple

import torch.nn as nn
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint, find_latest_checkpoint

from ..comb import comb_model
from ..comb.surgery import structural_copy
from .hook import STATE_KEY
from .plan import PLAN_META_KEY, PlanMismatchError, apply_plan
from ..distill.shrink import base_keep_from_comb

__all__ = ['CPDRunner', 'apply_checkpoint_plan', 'checkpoint_plan']


def checkpoint_plan(checkpoint: dict):
    """``(plan, kind)`` with kind 'shrunk', 'pruned' or 'gated', or
    ``(None, None)``."""
    state = checkpoint.get(STATE_KEY)
    if isinstance(state, dict) and state.get('physical') and \
            state.get('plan', {}).get('groups'):
        return state['plan'], 'shrunk'
    meta = checkpoint.get('meta') or {}
    if isinstance(meta, dict) and meta.get(PLAN_META_KEY):
        return meta[PLAN_META_KEY], 'pruned'
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


def apply_checkpoint_plan(model: nn.Module, path: str, checkpoint: dict,
                          load_weights: bool = True) -> Optional[dict]:
    """Prune ``model`` to the plan of ``checkpoint`` (and load its weights).

    Args:
        model: the bare model (not wrapped), a plain one or a
            :class:`CPDDistiller`, whose student is pruned and loaded; a
            'self' teacher is pruned too and gets the student's weights.
        path: the checkpoint's name, for messages.
        checkpoint: its content.
        load_weights: False applies only the structure (for a resume, which
            loads the weights itself); only 'pruned' checkpoints allow it.

    Returns:
        The plan, or None (and nothing is done) for a checkpoint without.

    Raises:
        PlanMismatchError: the plan or the weights do not fit the model.
    """
    plan, kind = checkpoint_plan(checkpoint)
    if plan is None:
        return None
    student = getattr(model, 'student', None)
    target = model if student is None else student
    state = checkpoint.get('state_dict', checkpoint)
    self_teacher = student is not None and \
        getattr(model, 'teacher_is_self', False)
    if kind == 'gated':
        if not load_weights:
            raise ValueError('a gated checkpoint needs its weights loaded '
                             'before the plan is applied')
        _load_strict(target, _strip(state), path)
        apply_plan(target, plan)
    else:
        comb = comb_model(target, input_shape=plan['input_shape'],
                          verify=False)
        apply_plan(target, plan, comb=comb)
        follow = getattr(model, 'follow_student_shrink', None)
        if kind == 'shrunk' and follow is not None and \
                not (self_teacher and load_weights):
            # the teacher keeps its size: the distiller follows the student
            follow(base_keep_from_comb(comb, comb.kept_from_plan(plan)))
        if load_weights:
            _load_strict(target, _strip(state), path)
    # a 'self' teacher is the pruned student's copy, except when a shrunk
    # run resumes: its teacher stayed the unpruned model
    if self_teacher and (load_weights or kind != 'shrunk'):
        apply_plan(model.teacher, plan)
        if load_weights:
            model.sync_teacher()
    return plan


@RUNNERS.register_module()
class CPDRunner(Runner):
    """mmengine ``Runner`` that loads pruned checkpoints with their plan.

    ``tools/train.py`` and ``tools/test.py`` build it unless the config sets
    ``runner_type`` (another ``Runner`` subclass is combined with it). With
    OpenMMLab's own tools, set ``runner_type = 'CPDRunner'`` in the config.

    On top of ``Runner``:

    * ``build_model``: when ``load_from`` holds a plan, the freshly built
      model is pruned to it and the weights are loaded *before*
      ``wrap_model`` wraps it in ``MMDistributedDataParallel``; the model's
      ``init_weights`` is then skipped (the checkpoint has every weight), as
      is the runner's own ``load_from`` step. A resumed run gets the plan's
      structure only (``resume`` loads the weights).
    * ``save_checkpoint``: the applied plan goes into ``meta['cpd_plan']``
      of every checkpoint, so the fine-tuned checkpoints resume and evaluate
      with the original config too.
    * a distillation checkpoint (``student.*`` keys) loads into a plain model
      config as its student (``student://``).

    Checkpoints without a plan load exactly as with ``Runner``.
    """

    def _checkpoint_to_adapt(self) -> Tuple[Optional[str], bool]:
        """The file ``load_or_resume`` will read, and whether it resumes."""
        if self._resume:
            return (self._load_from
                    or find_latest_checkpoint(self.work_dir)), True
        return self._load_from, False

    def build_model(self, model) -> nn.Module:
        """Build the model; prune it to ``load_from``'s plan, if it has one."""
        model = super().build_model(model)
        self._cpd_plan, self._cpd_loaded = None, False
        self.cpd_base_student = None  # the original of a shrunk student
        path, resume = self._checkpoint_to_adapt()
        if not path:
            return model
        checkpoint = _load_checkpoint(path, map_location='cpu')
        if not isinstance(checkpoint, dict):
            from ..utils.checkpoint import CheckpointLoadError
            raise CheckpointLoadError(
                path, f'expected a dict, got {type(checkpoint).__name__}')
        plan, kind = checkpoint_plan(checkpoint)
        if plan is None:
            from ..distill import is_distill_state_dict
            if not resume and not hasattr(model, 'student') and \
                    is_distill_state_dict(checkpoint.get('state_dict', {})):
                self._load_from = 'student://' + path  # its student only
            return model
        if resume and kind == 'gated':
            return model  # the pruning hook restores its masks on resume
        if resume and kind == 'shrunk':  # the hook combs the original
            self.cpd_base_student = structural_copy(
                getattr(model, 'student', model))
        try:
            apply_checkpoint_plan(model, path, checkpoint,
                                  load_weights=not resume)
        except PlanMismatchError as e:
            raise PlanMismatchError(f'checkpoint "{path}": {e}') from None
        self._cpd_plan = plan if kind != 'shrunk' else None
        if not resume:  # load_or_resume has nothing left to load
            self._cpd_loaded = self._has_loaded = True
        target = getattr(model, 'student', model)
        self.logger.info(
            f'CPD: pruned the model to the plan of {kind} checkpoint {path} '
            f'({sum(p.numel() for p in target.parameters()) / 1e6:.3f} M '
            'params) before wrapping it' +
            ('' if resume else ' and loaded its weights'))
        return model

    def _init_model_weights(self) -> None:
        if self._cpd_loaded:  # init_weights would overwrite the checkpoint
            self.logger.info('CPD: weights come from the pruned checkpoint, '
                             'init_weights skipped')
            return
        super()._init_model_weights()

    def save_checkpoint(self, out_dir, filename, file_client_args=None,
                        save_optimizer=True, save_param_scheduler=True,
                        meta=None, by_epoch=True, backend_args=None):
        """``Runner.save_checkpoint`` with the applied plan in ``meta``."""
        if self._cpd_plan is not None:
            meta = dict(meta or {})
            meta.setdefault(PLAN_META_KEY, self._cpd_plan)
        return super().save_checkpoint(
            out_dir, filename, file_client_args=file_client_args,
            save_optimizer=save_optimizer,
            save_param_scheduler=save_param_scheduler, meta=meta,
            by_epoch=by_epoch, backend_args=backend_args)
