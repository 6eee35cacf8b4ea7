"""CPDPruningHook: Hessian-importance channel pruning inside runner training."""
import copy
import os.path as osp
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.dist import (all_reduce, broadcast_object_list, is_distributed,
                           is_main_process)
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..comb import ChannelGates, comb_model, prune_model
from .cost import CostModel
from .importance import (IMPORTANCE_TYPES, ImportanceAccumulator,
                         normalise_by_memory)
from .plan import PLAN_META_KEY, make_plan
from .report import save_kept_chart, summary_table
from .schedule import select_channels, sparsity_at

STATE_KEY = 'cpd_pruning'


def inverse_loss_scale(optim_wrapper):
    """1 / the loss scale the next backward will use (AMP), or None; a
    device tensor or a float, never a host synchronisation."""
    scaler = getattr(optim_wrapper, 'loss_scaler', None)
    if scaler is None or not getattr(scaler, 'is_enabled', lambda: True)():
        return None
    scale = getattr(scaler, '_scale', None)
    if scale is None:  # set on the first scaled loss, to init_scale
        return 1.0 / float(scaler._init_scale)
    return torch.reciprocal(scale)


@HOOKS.register_module()
class CPDPruningHook(Hook):
    """Prune channels during training with the CPD method.

    Combs the model before training, scores channels every iteration from the
    gradients of the loss the runner backpropagates (task + distillation),
    and every ``interval`` iterations masks the lowest-scoring channels until
    the target sparsity; at the end it writes a physically pruned checkpoint.

    Args:
        target_sparsity (float): fraction of the model's parameters (or FLOPs
            with ``target='flops'``) to remove, counted on the deployed
            structure, in (0, 1). Default: 0.5.
        target (str): 'params' or 'flops'. Default: 'params'.
        interval (int): iterations between pruning steps. Default: 10.
        begin_iter (int): iteration of the first pruning step. Default: 0.
        end_iter (int, optional): iteration by which the target is reached
            (linear ramp). Default: ``begin_iter + 10 * interval``.
        importance (str): 'hessian' (the paper's), 'taylor', 'l1' or
            'random'. Default: 'hessian'.
        memory_norm (bool): divide scores by the activation memory of the
            channel's group. Default: True.
        exclude (Sequence[str]): conv/linear module names (of the student)
            whose output channels are never pruned. The model's outputs
            (classifier / decode layer) are always kept. Default: ().
        input_shape (Sequence[int]): example input for combing. Default:
            (1, 3, 224, 224).
        min_channels (int): channels every group keeps at least. Default: 1.
        round_to (int): every group keeps a multiple of ``round_to``
            channels (or all of them), e.g. 8 or 16 for the vector width of
            the deployment runtime; groups of ``round_to`` channels or
            fewer are not pruned. Default: 1.
        save_pruned (bool): write ``pruned_final.pth`` (physically pruned
            weights, plan in ``meta['cpd_plan']``) after training. Default:
            True.
        save_at (Sequence[float]): also write ``pruned_sparsity_XX.pth`` when
            these sparsities are reached. Default: ().
        seed (int): seed of the 'random' importance. Default: 0.

    Note:
        Masks, accumulated scores and the step count are saved in every
        checkpoint under ``'cpd_pruning'`` (``before_save_checkpoint``) and
        restored on resume, so an interrupted run ends with the same masks.
        Under DDP the scores are all-reduced so every rank masks the same
        channels. With the ``CPDDistiller`` wrapper the student is pruned.
        Priority NORMAL runs the pruning step before the CheckpointHook.
    """
    priority = 'NORMAL'

    def __init__(self, target_sparsity: float = 0.5, target: str = 'params',
                 interval: int = 10, begin_iter: int = 0,
                 end_iter: Optional[int] = None, importance: str = 'hessian',
                 memory_norm: bool = True, exclude: Sequence[str] = (),
                 input_shape: Sequence[int] = (1, 3, 224, 224),
                 min_channels: int = 1, round_to: int = 1,
                 save_pruned: bool = True, save_at: Sequence[float] = (),
                 seed: int = 0):
        if not isinstance(target_sparsity, (int, float)) or \
                not 0 < target_sparsity < 1:
            raise ValueError('`target_sparsity` must be in (0, 1), but got '
                             f'{target_sparsity!r}')
        if target not in ('params', 'flops'):
            raise ValueError(f"`target` must be 'params' or 'flops', but got "
                             f'{target!r}')
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'`interval` must be an int >= 1, but got '
                             f'{interval!r}')
        if not isinstance(begin_iter, int) or begin_iter < 0:
            raise ValueError(f'`begin_iter` must be >= 0, but got '
                             f'{begin_iter!r}')
        end_iter = begin_iter + 10 * interval if end_iter is None else end_iter
        if not isinstance(end_iter, int) or end_iter < begin_iter:
            raise ValueError(f'`end_iter` must be >= begin_iter '
                             f'({begin_iter}), but got {end_iter!r}')
        if importance not in IMPORTANCE_TYPES:
            raise ValueError(f'`importance` must be one of {IMPORTANCE_TYPES}'
                             f', but got {importance!r}')
        if len(input_shape) < 3 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f'`input_shape` must be like (1, 3, H, W), but '
                             f'got {input_shape!r}')
        if not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(f'`min_channels` must be >= 1, but got '
                             f'{min_channels!r}')
        if not isinstance(round_to, int) or round_to < 1:
            raise ValueError(f'`round_to` must be an int >= 1, but got '
                             f'{round_to!r}')
        for s in save_at:
            if not 0 < s <= target_sparsity:
                raise ValueError(f'`save_at` entries must be in (0, '
                                 f'target_sparsity], but got {s!r}')
        self.target_sparsity = float(target_sparsity)
        self.target = target
        self.interval, self.begin_iter, self.end_iter = \
            interval, begin_iter, end_iter
        self.importance, self.memory_norm = importance, memory_norm
        self.exclude = list(exclude)
        self.input_shape = [int(s) for s in input_shape]
        self.min_channels, self.round_to = min_channels, round_to
        self.save_pruned = save_pruned
        self.save_at = sorted(float(s) for s in save_at)
        self.seed = seed
        self.steps = 0
        self._resume_state = None
        self._last_iter = 0
        self.comb = None

    # ---------------------------------------------------------- set-up
    def _student(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        return getattr(model, 'student', model)

    def before_run(self, runner) -> None:
        """Refuse a schedule that the run cannot finish, before any work."""
        loop = getattr(runner, 'train_loop', None)
        max_iters = getattr(loop, 'max_iters', None)
        if isinstance(max_iters, int) and max_iters < self.end_iter:
            raise ValueError(
                f'CPDPruningHook: end_iter={self.end_iter} is after the last '
                f'training iteration ({max_iters}): the model would be saved '
                f'below its target ({self.target_sparsity:.0%} of '
                f'{self.target}). Set end_iter <= {max_iters} (and interval, '
                'begin_iter to match) or train longer.')

    def before_train(self, runner) -> None:
        student = self._student(runner)
        state = self._resume_state
        log = runner.logger
        # a resumed run keeps the groups its first run froze by verification
        self.comb = comb_model(student, input_shape=self.input_shape,
                               exclude=self.exclude, verify=state is None,
                               logger=log.info)
        self._sync_verification(state)
        self.cost = CostModel(student, self.comb)
        self.gates = ChannelGates(student, self.comb)
        self.scorer = ImportanceAccumulator(student, self.comb,
                                            self.importance, self.seed)
        self.kept = np.ones(self.comb.num_channels, dtype=bool)
        self.saved, self._warned_unscored = [], False
        self._inv_scale = None
        if state is not None:
            self._restore(state)
        self._set_kept(self.kept)
        n = len(self.comb.prunable_groups)
        log.info(
            f'CPD: combed {type(student).__name__}: {len(self.comb.groups)} '
            f'channel groups ({n} prunable), {self.comb.num_channels} channels'
            f', {int(self.comb.frozen_channels.sum())} frozen; '
            f'{self.cost.total_params / 1e6:.3f} M params, target sparsity '
            f'{self.target_sparsity:.0%} of {self.target}')
        if self.comb.verification is not None:
            log.info(f'CPD: verification: {self.comb.verification}')
        for g in self.comb.groups:
            if g.frozen.any() and g.size > 1:
                log.info(f'CPD: group {g.name} ({g.size} channels): '
                         f'{int(g.frozen.sum())} frozen: '
                         + '; '.join(g.reasons))
        if self.comb.unhandled_ops:
            log.warning('CPD: aten ops without a channel rule (their '
                        'channels are frozen): ' + ', '.join(
                            f'{k} x{v}' for k, v in
                            sorted(self.comb.unhandled_ops.items())))
        if n == 0:
            raise RuntimeError(
                'CPD: no prunable channel group was found (every group is '
                'frozen, see the reasons above); run tools/check_pruning.py '
                'on this config')

    def _sync_verification(self, state):
        """Every rank freezes the same groups: rank 0's verification (or the
        resumed run's) is the one that counts."""
        frozen = dict(state.get('verified_frozen', {})) if state else \
            dict(self.comb.verification.frozen)
        if is_distributed():
            obj = [frozen]
            broadcast_object_list(obj, src=0)
            frozen = obj[0]
        for name, reason in frozen.items():
            self.comb.freeze_group(self.comb.group(name), reason)
        self.verified_frozen = frozen

    def _set_kept(self, kept):
        """Apply a mask; deployed params/FLOPs are measured once here, not
        on every training iteration."""
        self.kept = kept
        self.gates.set_kept(kept)
        self._params, self._flops = self.cost.measure(kept)
        self._active = int(kept.sum())

    def sparsity(self) -> float:
        """Current sparsity of the deployed structure (params or FLOPs)."""
        if self.target == 'params':
            return 1.0 - self._params / self.cost.total_params
        return 1.0 - self._flops / self.cost.total_flops

    @property
    def finished(self) -> bool:
        """The ramp is over and the target reached: no more pruning."""
        return self._last_iter >= self.end_iter and \
            self.sparsity() >= self.target_sparsity - 1e-9

    # ---------------------------------------------------------- training
    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.comb is not None and self.scorer.active:
            self._inv_scale = inverse_loss_scale(runner.optim_wrapper)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if self.scorer.active or self.importance in ('l1', 'random'):
            self.scorer.step(self._inv_scale)
        cur = self._last_iter = runner.iter + 1
        if cur >= self.begin_iter and (cur - self.begin_iter) % \
                self.interval == 0 and self.sparsity() < \
                self.target_sparsity - 1e-9:
            self._prune_step(runner, cur)
        if self.scorer.active and self.finished:
            self.scorer.remove()  # no scoring cost for the rest of the run
            runner.logger.info(f'CPD: target reached at iter {cur}; '
                               'importance hooks removed')
        hub = runner.message_hub
        hub.update_scalar('train/cpd_sparsity', self.sparsity())
        hub.update_scalar('train/cpd_params_M', self._params / 1e6)
        hub.update_scalar('train/cpd_flops_ratio',
                          self._flops / self.cost.total_flops)
        hub.update_scalar('train/cpd_active_channels', self._active)

    def _prune_step(self, runner, cur):
        goal = sparsity_at(cur, self.begin_iter, self.end_iter,
                           self.target_sparsity)
        if goal <= self.sparsity():
            return
        if is_distributed() and self.importance in ('hessian', 'taylor'):
            all_reduce(self.scorer.scores, op='sum')
        scores = self.scorer.current(self.steps)
        if self.memory_norm:
            scores = normalise_by_memory(scores, self.comb, self.kept)
        unscored = self.scorer.unscored
        if is_distributed():
            t = torch.as_tensor(unscored.astype(np.float32))
            all_reduce(t, op='sum')
            unscored = t.numpy() > 0
        if unscored.any() and not self._warned_unscored:
            self._warned_unscored = True
            names = [g.name for g in self.comb.groups
                     if unscored[g.channels].any()]
            runner.logger.warning(
                f'CPD: {len(names)} group(s) are not pruned: their layers\' '
                'outputs do not require grad (frozen parameters, e.g. '
                'frozen_stages), so no gate gradient exists: '
                + ', '.join(names[:8]) + (' ...' if len(names) > 8 else ''))
        total = (self.cost.total_params if self.target == 'params'
                 else self.cost.total_flops)
        self._set_kept(select_channels(scores, self.kept, self.comb,
                                       self.cost, (1 - goal) * total,
                                       self.target, self.min_channels,
                                       self.round_to, protected=unscored))
        self.scorer.reset()
        self.steps += 1
        runner.logger.info(
            f'CPD step {self.steps} at iter {cur}: sparsity '
            f'{self.sparsity():.3f} (goal {goal:.3f}), params '
            f'{self._params / 1e6:.3f} M, active channels '
            f'{self._active}/{self.comb.num_channels}')
        for s in self.save_at:
            if s not in self.saved and self.sparsity() >= s - 1e-3:
                self.saved.append(s)
                self.save_pruned_checkpoint(
                    runner, f'pruned_sparsity_{int(round(s * 100))}.pth')

    def after_train(self, runner) -> None:
        if self.comb is None:
            return
        if self.sparsity() < self.target_sparsity - 1e-3:
            runner.logger.warning(
                f'CPD: training ended at sparsity {self.sparsity():.3f}, '
                f'below the target {self.target_sparsity:.3f}')
        plan = make_plan(self.comb, self.kept, self._student(runner))
        if is_main_process():
            from .plan import save_plan
            save_plan(plan, osp.join(runner.work_dir, 'cpd_plan.json'))
            runner.logger.info('CPD kept channels per group:\n' +
                               summary_table(self.comb, self.kept))
            save_kept_chart(self.comb, self.kept,
                            osp.join(runner.work_dir, 'cpd_kept_channels.png'))
        if self.save_pruned:
            self.save_pruned_checkpoint(runner, 'pruned_final.pth')

    def save_pruned_checkpoint(self, runner, filename: str) -> str:
        """Write the physically pruned student with its plan in meta."""
        from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
        student = self._student(runner)
        plan = make_plan(self.comb, self.kept, student)
        self.gates.remove()
        try:
            small = prune_model(copy.deepcopy(student), self.comb, self.kept)
        finally:
            self.gates = ChannelGates(student, self.comb)
            self.gates.set_kept(self.kept)
        path = osp.join(runner.work_dir, filename)
        if is_main_process():
            meta = {PLAN_META_KEY: plan, 'iter': runner.iter,
                    'sparsity': self.sparsity(),
                    'params': int(sum(p.numel() for p in small.parameters())),
                    'cfg': runner.cfg.pretty_text}
            save_checkpoint({'state_dict': weights_to_cpu(small.state_dict()),
                             'meta': meta}, path)
            runner.logger.info(f'CPD: pruned checkpoint saved to {path} '
                               f'({meta["params"] / 1e6:.3f} M params)')
        return path

    # ------------------------------------------------------ checkpoints
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.comb is None:
            return
        checkpoint[STATE_KEY] = dict(
            removed=[int(i) for i in np.nonzero(~self.kept)[0]],
            num_channels=int(self.comb.num_channels), steps=int(self.steps),
            saved=[float(s) for s in self.saved],
            scorer=self.scorer.state_dict(),
            verified_frozen=dict(self.verified_frozen),
            plan=make_plan(self.comb, self.kept, self._student(runner)))

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._resume_state = checkpoint.get(STATE_KEY)

    def _restore(self, state):
        if state['num_channels'] != self.comb.num_channels:
            raise ValueError(
                f'CPD: the checkpoint was pruned on a model with '
                f'{state["num_channels"]} channels, this one has '
                f'{self.comb.num_channels}')
        kept = np.ones(self.comb.num_channels, dtype=bool)
        kept[np.asarray(state['removed'], dtype=np.int64)] = False
        if (~kept & self.comb.frozen_channels).any():
            raise ValueError('CPD: the checkpoint removed channels that this '
                             'model freezes; was it made with another '
                             'version of cpd_mm or another exclude list?')
        self.kept = kept
        self.steps = int(state['steps'])
        self.saved = list(state.get('saved', []))
        self.scorer.load_state_dict(state['scorer'])
