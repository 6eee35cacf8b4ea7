"""CPDPruningHook: the runner's side of a :class:`PruningSession`."""
import gc
import inspect
import os.path as osp
from typing import Sequence

import torch.nn as nn
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from .importance import inverse_loss_scale
from .plan import save_plan
from .report import save_kept_chart, summary_table
from .session import PruningSession, TrainingState
from .shrink import rewrap_ddp

STATE_KEY = 'cpd_pruning'


@HOOKS.register_module()
class CPDPruningHook(Hook):
    """Prune channels during training with the CPD method.

    Combs the student before training (with self-verification), scores
    channels every iteration from the gradients of the loss the runner
    backpropagates (task + distillation), every ``interval`` iterations
    masks the channels with the least importance per unit of cost until the
    target, and removes them physically from the student (``shrink``), so
    training gets cheaper as it prunes; at the end it writes
    ``pruned_final.pth``. The work is done by a
    :class:`~cpd_mm.prune.PruningSession`; this hook reads the runner.

    Args:
        save_pruned (bool): write ``pruned_final.pth`` (physically pruned
            weights, plan in ``meta['cpd_plan']``) after training, once it
            is checked to compute what the gated model computes. Default:
            True.
        save_at (Sequence[float]): also write ``pruned_sparsity_XX.pth`` when
            these sparsities are reached. Default: ().
        **options: the pruning options of
            :class:`~cpd_mm.prune.PruningSession` (``target_sparsity``,
            ``target``, ``interval``, ``begin_iter``, ``end_iter``,
            ``importance``, ``ranking``, ``memory_norm``, ``max_removal``,
            ``exclude``, ``input_shape``, ``min_channels``, ``round_to``,
            ``shrink``, ``seed``, ``latency_*``), documented in
            docs/hook_reference.md.

    Note:
        Checkpoints hold the session's state (masks, scores, plan; the
        shrunk student's weights after a shrink: ``CPDRunner`` rebuilds it
        on ``--resume``). Priority NORMAL runs the pruning step before the
        CheckpointHook. See docs/hook_reference.md.
    """
    priority = 'NORMAL'

    def __init__(self, save_pruned: bool = True, save_at: Sequence[float] = (),
                 **options):
        unknown = sorted(set(options) - set(PruningSession.options()))
        if unknown:
            known = ['save_pruned', 'save_at'] + PruningSession.options()
            raise ValueError(f'CPDPruningHook got unknown option(s) '
                             f'{unknown}; the options are {known}')
        self.session = PruningSession(None, **options)  # validates them
        for v in save_at:
            if not (isinstance(v, (int, float)) and
                    0 < v <= self.session.target_sparsity):
                raise ValueError('`save_at` must have entries in (0, '
                                 f'target_sparsity], but got {v!r}')
        self.save_pruned, self.save_at = save_pruned, sorted(save_at)
        self._state = None
        self.ready = False

    def __getattr__(self, name):  # the session's options and results
        if name != 'session' and 'session' in self.__dict__:
            return getattr(self.__dict__['session'], name)
        raise AttributeError(name)

    @staticmethod
    def _model(runner):
        """The runner's model without its DDP wrapper (a distiller or the
        student itself)."""
        return runner.model.module if is_model_wrapper(runner.model) \
            else runner.model

    def before_run(self, runner) -> None:
        """Refuse a schedule that the run cannot finish, before any work."""
        max_iters = getattr(getattr(runner, 'train_loop', None),
                            'max_iters', None)
        end = self.session.end_iter
        if isinstance(max_iters, int) and max_iters < end:
            raise ValueError(
                f'CPDPruningHook: end_iter={end} is after the last training '
                f'iteration ({max_iters}): the model would be saved below '
                f'its target ({self.session.target_sparsity:.0%} of '
                f'{self.session.target}). Set end_iter <= {max_iters} (and '
                'interval, begin_iter to match) or train longer.')

    def before_train(self, runner) -> None:
        s, model = self.session, self._model(runner)
        s.student, s.log, s.work_dir = getattr(model, 'student', model), \
            runner.logger, runner.work_dir
        if is_model_wrapper(runner.model) and s.shrink != 'never' and \
                not hasattr(runner.model, 'reducer'):
            runner.logger.warning(
                f'CPD: {type(runner.model).__name__} cannot be rebuilt '
                'around a shrunk student: shrink=\'never\' (the student is '
                'pruned physically after training)')
            s.shrink = 'never'
        s.setup(self._state, getattr(runner, 'cpd_base_student', None))
        runner.cpd_base_student = None  # combed: its memory can go
        self._train_state = self._training(runner)  # once, not per iter
        self.ready = True

    def _training(self, runner) -> TrainingState:
        wrappers = getattr(runner.optim_wrapper, 'optim_wrappers', None)
        wrappers = list(wrappers.values()) if wrappers else \
            [runner.optim_wrapper]

        def rewrap():
            runner.model = rewrap_ddp(runner.model)
            gc.collect()  # the old wrapper's reducer lets go of its hooks
        return TrainingState(
            optimizers=[w.optimizer for w in wrappers],
            averaged=[h.ema_model for h in runner.hooks  # EMAHook's
                      if isinstance(getattr(h, 'ema_model', None), nn.Module)],
            owner=self._model(runner),
            rewrap=rewrap if is_model_wrapper(runner.model) else None)

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if not self.ready or not self.session._scoring:
            return
        self._inv_scale = inverse_loss_scale(runner.optim_wrapper)
        if self.session.needs_loss:  # buffers: the distiller's too
            self.session.before_iter(self._loss_fn(runner, data_batch),
                                     module=self._model(runner))

    def _loss_fn(self, runner, data_batch):
        """The training loss of ``data_batch`` (task + distillation), as
        the train step computes it, without DDP's hooks or an update."""
        model = self._model(runner)

        def loss():
            with runner.optim_wrapper.optim_context(model):
                data = model.data_preprocessor(data_batch, True)
                losses = model._run_forward(data, mode='loss')
            return model.parse_losses(losses)[0]
        return loss

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if not self.ready:
            return
        s = self.session
        changed = s.after_iter(runner.iter + 1, self._train_state,
                               getattr(self, '_inv_scale', None))
        for v in self.save_at:
            if changed and v not in s.saved and s.sparsity() >= v - 1e-3:
                s.saved.append(v)
                self.save_pruned_checkpoint(
                    runner, f'pruned_sparsity_{int(round(v * 100))}.pth')
        for k, v in s.metrics().items():
            runner.message_hub.update_scalar(f'train/{k}', v)

    def after_train(self, runner) -> None:
        if not self.ready:
            return
        s = self.session
        if s.sparsity() < s.target_sparsity - 1e-3:
            runner.logger.warning(
                f'CPD: training ended at sparsity {s.sparsity():.3f}, below '
                f'the target {s.target_sparsity:.3f}')
        if is_main_process():
            save_plan(s.plan(), osp.join(runner.work_dir, 'cpd_plan.json'))
            runner.logger.info('CPD kept channels per group:\n' +
                               summary_table(s.base, s.kept))
            save_kept_chart(s.base, s.kept,
                            osp.join(runner.work_dir, 'cpd_kept_channels.png'))
        if self.save_pruned:
            self.save_pruned_checkpoint(runner, 'pruned_final.pth')

    def save_pruned_checkpoint(self, runner, filename: str) -> str:
        """Write the physically pruned student with its plan in meta."""
        return self.session.save_pruned(
            osp.join(runner.work_dir, filename),
            dict(iter=runner.iter, cfg=runner.cfg.pretty_text))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if not self.ready:
            return
        checkpoint[STATE_KEY] = self.session.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._state = checkpoint.get(STATE_KEY)


def _signature():
    """The hook's real keyword arguments (its own and the session's), for
    ``inspect`` and the tools that check config keys against them."""
    own = [p for p in inspect.signature(CPDPruningHook.__init__).parameters
           .values() if p.kind != p.VAR_KEYWORD]
    session = inspect.signature(PruningSession.__init__).parameters
    return inspect.Signature(own + [
        p.replace(kind=p.KEYWORD_ONLY) for n, p in session.items()
        if n in PruningSession.options()])


CPDPruningHook.__init__.__signature__ = _signature()
