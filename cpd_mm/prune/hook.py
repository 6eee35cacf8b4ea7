"""CPDPruningHook: Hessian-importance channel pruning inside runner training."""
import os.path as osp
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.dist import (all_gather_object, all_reduce,
                           broadcast_object_list, is_distributed,
                           is_main_process)
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..comb import ChannelGates, comb_model
from .cost import METRICS, CostModel
from .importance import (IMPORTANCE_TYPES, ImportanceAccumulator,
                         inverse_loss_scale, normalise_by_memory)
from .plan import make_plan
from .report import save_kept_chart, summary_table
from .schedule import RANKINGS, select_channels, sparsity_at
from .snapshot import example_input, save_pruned

STATE_KEY = 'cpd_pruning'


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok, name, expected, value):
    if not ok:
        raise ValueError(f'`{name}` must be {expected}, but got {value!r}')


@HOOKS.register_module()
class CPDPruningHook(Hook):
    """Prune channels during training with the CPD method.

    Combs the model before training (with self-verification), scores
    channels every iteration from the gradients of the loss the runner
    backpropagates (task + distillation), and every ``interval`` iterations
    masks the channels with the least importance per unit of cost until the
    target; at the end it writes a physically pruned checkpoint.

    Args:
        target_sparsity (float): fraction of the model's parameters (FLOPs,
            latency with ``target='flops'`` / ``'latency'``) to remove,
            counted on the deployed structure, in (0, 1). Default: 0.5.
        target (str): 'params', 'flops' or 'latency' (predicted by a
            latency table measured on the deployment runtime before
            training, see ``latency_shape``). Default: 'params'.
        interval (int): iterations between pruning steps. Default: 10.
        begin_iter (int): iteration of the first pruning step. Default: 0.
        end_iter (int, optional): iteration by which the target is reached
            (linear ramp). Default: ``begin_iter + 10 * interval``.
        importance (str): 'hessian' (the paper's practical score),
            'hessian_fd' (the paper's finite-difference variant: two more
            forward/backward passes per iteration), 'taylor', 'l1' or
            'random'. Default: 'hessian'.
        ranking (str): 'cost': remove what has the least importance per
            unit of the target it saves (marginal costs, re-measured as
            widths shrink); 'score': the lowest scores first (the paper's
            selection, with memory-normalised scores). Default: 'cost'.
        memory_norm (bool, optional): divide scores by the activation memory
            of the channel's group (the paper's proxy for cost). Default:
            None, i.e. True with ``ranking='score'``, False with 'cost'.
        max_removal (float): the largest share of a group's channels that
            may go, in (0, 1]; every group keeps the rest. Default: 0.8.
        exclude (Sequence[str]): conv/linear module names (of the student)
            whose output channels are never pruned. The model's outputs
            (classifier / decode layer) are always kept. Default: ().
        input_shape (Sequence[int]): example input for combing. Default:
            (1, 3, 224, 224).
        min_channels (int): channels every group keeps at least. Default: 1.
        round_to (int): every producing module keeps a multiple of
            ``round_to`` of its output channels (or all of them), e.g. 8 or
            16 for the vector width of the deployment runtime; the branches
            of a concat count one by one. Groups of ``round_to`` channels or
            fewer are not pruned. Default: 1.
        save_pruned (bool): write ``pruned_final.pth`` (physically pruned
            weights, plan in ``meta['cpd_plan']``) after training, once it
            is checked to compute what the gated model computes. Default:
            True.
        save_at (Sequence[float]): also write ``pruned_sparsity_XX.pth`` when
            these sparsities are reached. Default: ().
        seed (int): seed of the 'random' importance. Default: 0.
        latency_shape (Sequence[int], optional): input shape the latency
            table is measured at (the deployment size). Default:
            ``input_shape``.
        latency_providers (Sequence[str], optional): onnxruntime providers;
            default: CUDA/TensorRT when available, else CPU.
        latency_threads (int): onnxruntime threads for the table. Default: 1.
        latency_precision (str): precision the table is measured in,
            'fp32' or 'int8' (graphs quantized as ``tools/export_onnx.py
            --int8`` does), so that ``target='latency'`` picks the structure
            that is fastest in the deployed precision. Default: 'fp32'.

    Note:
        Masks, accumulated scores and the step count are saved in every
        checkpoint under ``'cpd_pruning'`` (``before_save_checkpoint``) and
        restored on resume, so an interrupted run ends with the same masks.
        Under DDP each iteration's scores are all-reduced (one small
        collective an iteration), so every rank holds the same sums and
        masks the same channels, and the checkpoint rank 0 writes holds the
        whole run's scores. With the ``CPDDistiller`` wrapper the student is
        pruned. Priority NORMAL runs the pruning step before the
        CheckpointHook. A pruned checkpoint is written only when the pruned
        model computes what the gated one does; otherwise the run stops with
        the groups that differ and the gated model is kept as
        ``<name>.FAILED_gated.pth`` (see :mod:`cpd_mm.prune.snapshot`).
        Layers that do not train (``frozen_stages``) get no gate gradient
        with 'hessian' and 'taylor': they are found before training, never
        pruned, and the reachability check counts them.
    """
    priority = 'NORMAL'

    def __init__(self, target_sparsity: float = 0.5, target: str = 'params',
                 interval: int = 10, begin_iter: int = 0,
                 end_iter: Optional[int] = None, importance: str = 'hessian',
                 ranking: str = 'cost', memory_norm: Optional[bool] = None,
                 max_removal: float = 0.8, exclude: Sequence[str] = (),
                 input_shape: Sequence[int] = (1, 3, 224, 224),
                 min_channels: int = 1, round_to: int = 1,
                 save_pruned: bool = True, save_at: Sequence[float] = (),
                 seed: int = 0,
                 latency_shape: Optional[Sequence[int]] = None,
                 latency_providers: Optional[Sequence[str]] = None,
                 latency_threads: int = 1,
                 latency_precision: str = 'fp32'):
        end_iter = begin_iter + 10 * interval if end_iter is None \
            and isinstance(interval, int) and isinstance(begin_iter, int) \
            else end_iter
        _check(_number(target_sparsity) and 0 < target_sparsity < 1,
               'target_sparsity', 'in (0, 1)', target_sparsity)
        _check(target in METRICS, 'target', f'one of {METRICS}', target)
        _check(ranking in RANKINGS, 'ranking', f'one of {RANKINGS}', ranking)
        _check(_number(max_removal) and 0 < max_removal <= 1, 'max_removal',
               'in (0, 1]', max_removal)
        _check(isinstance(interval, int) and interval >= 1, 'interval',
               'an int >= 1', interval)
        _check(isinstance(begin_iter, int) and begin_iter >= 0, 'begin_iter',
               '>= 0', begin_iter)
        _check(isinstance(end_iter, int) and end_iter >= begin_iter,
               'end_iter', f'>= begin_iter ({begin_iter})', end_iter)
        _check(importance in IMPORTANCE_TYPES, 'importance',
               f'one of {IMPORTANCE_TYPES}', importance)
        for name, shape in (('input_shape', input_shape),
                            ('latency_shape', latency_shape or input_shape)):
            _check(len(shape) >= 3 and all(int(v) >= 1 for v in shape), name,
                   'like (1, 3, H, W)', shape)
        for name, v in (('min_channels', min_channels),
                        ('round_to', round_to),
                        ('latency_threads', latency_threads)):
            _check(isinstance(v, int) and v >= 1, name, 'an int >= 1', v)
        _check(latency_precision in ('fp32', 'int8'), 'latency_precision',
               "'fp32' or 'int8'", latency_precision)
        for v in save_at:
            _check(_number(v) and 0 < v <= target_sparsity, 'save_at',
                   'entries in (0, target_sparsity]', v)
        self.target_sparsity = float(target_sparsity)
        self.target = target
        self.interval, self.begin_iter, self.end_iter = \
            interval, begin_iter, end_iter
        self.importance, self.ranking = importance, ranking
        self.memory_norm = (ranking == 'score') if memory_norm is None \
            else bool(memory_norm)
        self.max_removal = float(max_removal)
        self.latency_shape = list(latency_shape or input_shape)
        self.latency_providers = latency_providers
        self.latency_threads = latency_threads
        self.latency_precision = latency_precision
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
    @staticmethod
    def _model(runner):
        """The runner's model without its DDP wrapper (a distiller or the
        student itself)."""
        return runner.model.module if is_model_wrapper(runner.model) \
            else runner.model

    def _student(self, runner):
        model = self._model(runner)
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
        table = self._latency_table(student, log) \
            if self.target == 'latency' else None
        self.cost = CostModel(student, self.comb, table)
        self.gates = ChannelGates(student, self.comb)
        self.scorer = ImportanceAccumulator(
            student, self.comb, self.importance, self.seed,
            reduce=(lambda t: all_reduce(t, op='sum'))
            if is_distributed() else None)
        self.kept = np.ones(self.comb.num_channels, dtype=bool)
        self.saved = []
        self._inv_scale, self._scoring = None, True
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
        self._find_unscored(student, log)
        self._check_reachable(log)

    def _find_unscored(self, student, log):
        """Channels no gradient will score (frozen layers), found before
        training: protected from the first step, counted by the budget."""
        unscored = self.scorer.find_unscored(student, example_input(
            self.comb, next(iter(student.parameters()))))
        names = [g.name for g in self.comb.prunable_groups
                 if unscored[g.channels].any()]
        if names:
            log.warning(
                f'CPD: {len(names)} group(s) are not pruned: their layers\' '
                'outputs do not require grad (frozen parameters, e.g. '
                'frozen_stages), so no gate gradient exists: '
                + ', '.join(names[:8]) + (' ...' if len(names) > 8 else ''))

    def _check_reachable(self, log):
        """Refuse, before training, a target that the floors forbid: the
        selection itself, run to an empty budget, gives the smallest
        structure that ``max_removal``, ``min_channels``, ``round_to``, the
        frozen groups and the unscored channels leave (for 'latency': as
        the table predicts)."""
        total = self.cost.total(self.target)
        smallest = select_channels(
            np.zeros(self.comb.num_channels), np.ones_like(self.kept),
            self.comb, self.cost, 0.0, self.target, self.min_channels,
            self.round_to, protected=self.scorer.unscored,
            max_removal=self.max_removal, ranking='score')
        reachable = 1.0 - self.cost.evaluate(smallest, self.target) / total
        log.info(f'CPD: the floors allow a sparsity of {reachable:.3f} of '
                 f'{self.target} at most')
        if reachable < self.target_sparsity - 1e-3:
            what = ('the latency table (measured on '
                    f'{self.cost.table.provider} at {self.latency_shape}) '
                    'predicts that the smallest structure keeps '
                    if self.target == 'latency' else
                    'the smallest structure keeps ')
            raise ValueError(
                f'CPDPruningHook: target_sparsity={self.target_sparsity} of '
                f'{self.target} cannot be reached: with max_removal='
                f'{self.max_removal}, min_channels={self.min_channels}, '
                f'round_to={self.round_to}, the frozen groups and '
                f'{int(self.scorer.unscored.sum())} channel(s) of layers '
                'that do not train, ' + what +
                f'{1 - reachable:.1%} of it (sparsity {reachable:.3f} at '
                'most). Lower target_sparsity, raise max_removal, or lower '
                'round_to' + ('; a latency measured at a small latency_shape'
                              ' is mostly fixed overhead: use the deployment '
                              'input size' if self.target == 'latency'
                              else '') + '.')

    def _latency_table(self, student, log):
        """Rank 0 measures (or loads from its cache) the latency table of
        the bare student, before gates change its graph; every rank gets
        rank 0's."""
        from ..deploy.latency_table import LatencyTable
        data = [None]
        if is_main_process():
            table = LatencyTable.build(
                student, self.latency_shape,
                providers=self.latency_providers,
                threads=self.latency_threads, logger=log,
                precision=self.latency_precision)
            data = [table.data]
            if self.round_to % max(table.channel_block, 1):
                log.warning(
                    f'CPD: round_to={self.round_to} is not a multiple of '
                    f'{table.channel_block}, the channel block of '
                    f'{table.provider} on this CPU: widths off that block '
                    'run slower than the latency table predicts')
        if is_distributed():
            broadcast_object_list(data, src=0)
        table = LatencyTable(data[0])
        log.info(f'CPD: latency table: {table.full_ms:.2f} ms measured on '
                 f'{table.provider} at {self.latency_shape} in '
                 f'{table.precision.upper()}')
        return table

    def _sync_verification(self, state):
        """Every rank freezes the same groups: the union of what each
        rank's verification (or the resumed run's) froze. A group that
        failed its check anywhere is not trusted anywhere, and a freeze
        cannot be undone on the rank that made it."""
        frozen = frozen_here = dict(state.get('verified_frozen', {})) \
            if state else dict(self.comb.verification.frozen)
        if is_distributed():  # the same dict, in rank order, everywhere
            frozen = {}
            for rank, found in enumerate(all_gather_object(frozen_here)):
                for name, reason in found.items():
                    frozen.setdefault(name, reason if rank == 0 else
                                      f'{reason} (on rank {rank})')
        for name, reason in frozen.items():
            self.comb.freeze_group(self.comb.group(name), reason)
        self.verified_frozen = frozen

    def _set_kept(self, kept):
        """Apply a mask; deployed params/FLOPs are measured once here, not
        on every training iteration."""
        self.kept = kept
        self.gates.set_kept(kept)
        self._params, self._flops = self.cost.measure(kept)
        self._value = self.cost.evaluate(kept, self.target)
        self._active = int(kept.sum())

    def sparsity(self) -> float:
        """Current sparsity of the deployed structure in the target's
        metric (params, FLOPs or predicted latency)."""
        return 1.0 - self._value / self.cost.total(self.target)

    @property
    def finished(self) -> bool:
        """The ramp is over and the target reached: no more pruning."""
        return self._last_iter >= self.end_iter and \
            self.sparsity() >= self.target_sparsity - 1e-9

    # ---------------------------------------------------------- training
    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if self.comb is None or not self._scoring:
            return
        self._inv_scale = inverse_loss_scale(runner.optim_wrapper)
        if self.importance == 'hessian_fd':  # buffers: the distiller's too
            self.scorer.probe(self.gates, self._loss_fn(runner, data_batch),
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
        if self._scoring:
            self.scorer.step(self._inv_scale)
        cur = self._last_iter = runner.iter + 1
        if cur >= self.begin_iter and (cur - self.begin_iter) % \
                self.interval == 0 and self.sparsity() < \
                self.target_sparsity - 1e-9:
            self._prune_step(runner, cur)
        if self._scoring and self.finished:
            self._scoring = False
            self.scorer.remove()  # no scoring cost for the rest of the run
            runner.logger.info(f'CPD: target reached at iter {cur}; '
                               'importance hooks removed')
        hub = runner.message_hub
        hub.update_scalar('train/cpd_sparsity', self.sparsity())
        hub.update_scalar('train/cpd_params_M', self._params / 1e6)
        hub.update_scalar('train/cpd_flops_ratio',
                          self._flops / self.cost.total_flops)
        if self.target == 'latency':
            hub.update_scalar('train/cpd_latency_ms', self._value)
        hub.update_scalar('train/cpd_active_channels', self._active)

    def _prune_step(self, runner, cur):
        goal = sparsity_at(cur, self.begin_iter, self.end_iter,
                           self.target_sparsity)
        if goal <= self.sparsity():
            return
        scores = self.scorer.current(self.steps)  # the same on every rank
        if self.memory_norm:
            scores = normalise_by_memory(scores, self.comb, self.kept)
        unscored = self.scorer.unscored
        if is_distributed():  # (a layer only one rank saw not training)
            t = torch.as_tensor(unscored.astype(np.float32))
            all_reduce(t, op='sum')
            unscored = t.numpy() > 0
        total = self.cost.total(self.target)
        self._set_kept(select_channels(
            scores, self.kept, self.comb, self.cost, (1 - goal) * total,
            self.target, self.min_channels, self.round_to,
            protected=unscored, max_removal=self.max_removal,
            ranking=self.ranking))
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
        return save_pruned(runner, self._student(runner), self.comb,
                           self.gates, self.kept, filename,
                           dict(sparsity=self.sparsity(), target=self.target))

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
