"""PruningSession: one student pruned during training, runner or not.

The session owns comb, gates, scorer, cost model, selection and shrink.
Plans, costs and the selection live in the channel space of the original
student (``base``); gates and scores live on the student as it is now,
which :mod:`~cpd_mm.prune.shrink` makes smaller at every pruning step
(``shrink='step'``), once the target is reached (``'end'``) or never.
:class:`~cpd_mm.prune.CPDPruningHook` drives it from an mmengine runner;
a plain PyTorch loop drives it like this::

    session = PruningSession(model, target_sparsity=0.5, interval=10,
                             end_iter=100, input_shape=(1, 3, 32, 32))
    session.setup()
    for it, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.after_iter(it + 1, TrainingState(optimizers=[optimizer]))
    pruned = session.student  # smaller, with ``session.plan()``
"""
import inspect
import os.path as osp
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from mmengine.dist import all_reduce, is_distributed

from ..comb import ChannelGates, comb_model, prune_model
from ..distill.shrink import base_keep_from_comb
from . import preflight
from .cost import METRICS, CostModel
from .importance import (IMPORTANCE_TYPES, ImportanceAccumulator,
                         normalise_by_memory)
from .plan import make_plan
from .schedule import RANKINGS, select_channels, sparsity_at
from .shrink import TrainingState, map_channels, shrink_student
from .snapshot import PrunedCheckError, check_pruned, example_input

SHRINK_MODES = ('step', 'end', 'never')


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(ok, name, expected, value):
    if not ok:
        raise ValueError(f'`{name}` must be {expected}, but got {value!r}')


class PruningSession:
    """Prune ``student`` with the CPD method while it trains.

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
        importance (str): 'hessian' (the paper's practical score: squared
            batch gradients of the gates), 'fisher' (the same estimate from
            per-sample gate gradients: far less noisy; keeps one more
            activation per gated layer while pruning), 'hessian_fd' (the
            paper's finite-difference variant: two more forward/backward
            passes per iteration), 'taylor', 'l1' or 'random'. Default:
            'hessian'.
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
        shrink (str): 'step': remove the masked channels from the student
            physically after every pruning step (the optimizer state,
            gradients, EMA copies and DDP wrapper follow, see
            :mod:`~cpd_mm.prune.shrink`); 'end': once, when the target is
            reached; 'never': masks only, the student keeps its size.
            Default: 'step'.
        logger: an object with ``info`` and ``warning`` (a runner's
            logger), or None (print).
    """

    def __init__(self, student: nn.Module, target_sparsity: float = 0.5,
                 target: str = 'params', interval: int = 10,
                 begin_iter: int = 0, end_iter: Optional[int] = None,
                 importance: str = 'hessian', ranking: str = 'cost',
                 memory_norm: Optional[bool] = None,
                 max_removal: float = 0.8, exclude: Sequence[str] = (),
                 input_shape: Sequence[int] = (1, 3, 224, 224),
                 min_channels: int = 1, round_to: int = 1,
                 shrink: str = 'step', seed: int = 0,
                 latency_shape: Optional[Sequence[int]] = None,
                 latency_providers: Optional[Sequence[str]] = None,
                 latency_threads: int = 1, latency_precision: str = 'fp32',
                 logger=None):
        if end_iter is None and isinstance(interval, int) and \
                isinstance(begin_iter, int):
            end_iter = begin_iter + 10 * interval
        _check(_number(target_sparsity) and 0 < target_sparsity < 1,
               'target_sparsity', 'in (0, 1)', target_sparsity)
        for name, v, allowed in (
                ('target', target, METRICS), ('ranking', ranking, RANKINGS),
                ('importance', importance, IMPORTANCE_TYPES),
                ('shrink', shrink, SHRINK_MODES),
                ('latency_precision', latency_precision, ('fp32', 'int8'))):
            _check(v in allowed, name, f'one of {allowed}', v)
        _check(_number(max_removal) and 0 < max_removal <= 1, 'max_removal',
               'in (0, 1]', max_removal)
        _check(isinstance(interval, int) and interval >= 1, 'interval',
               'an int >= 1', interval)
        _check(isinstance(begin_iter, int) and begin_iter >= 0, 'begin_iter',
               '>= 0', begin_iter)
        _check(isinstance(end_iter, int) and end_iter >= begin_iter,
               'end_iter', f'>= begin_iter ({begin_iter})', end_iter)
        for name, shape in (('input_shape', input_shape),
                            ('latency_shape', latency_shape or input_shape)):
            _check(len(shape) >= 3 and all(int(v) >= 1 for v in shape), name,
                   'like (1, 3, H, W)', shape)
        for name, v in (('min_channels', min_channels),
                        ('round_to', round_to),
                        ('latency_threads', latency_threads)):
            _check(isinstance(v, int) and v >= 1, name, 'an int >= 1', v)
        self.student = student
        self.target_sparsity, self.target = float(target_sparsity), target
        self.interval, self.begin_iter, self.end_iter = \
            interval, begin_iter, end_iter
        self.importance, self.ranking, self.shrink = importance, ranking, \
            shrink
        self.memory_norm = (ranking == 'score') if memory_norm is None \
            else bool(memory_norm)
        self.max_removal = float(max_removal)
        self.exclude = list(exclude)
        self.input_shape = [int(s) for s in input_shape]
        self.min_channels, self.round_to = min_channels, round_to
        self.seed = seed
        self.latency = dict(shape=list(latency_shape or input_shape),
                            providers=latency_providers,
                            threads=latency_threads,
                            precision=latency_precision)
        self.log = logger
        self.steps, self._last_iter, self.base = 0, 0, None
        self.gates = self.scorer = None
        self.work_dir = '.'  # where a failed shrink check leaves its file

    @classmethod
    def options(cls) -> List[str]:
        """Names of the pruning options (the hook's arguments)."""
        return [p for p in inspect.signature(cls).parameters
                if p not in ('student', 'logger')]

    def _info(self, msg):
        (self.log.info if self.log is not None else print)(msg)

    def _warn(self, msg):
        (self.log.warning if self.log is not None else print)(msg)

    # ---------------------------------------------------------- set-up
    def setup(self, state: Optional[dict] = None,
              base: Optional[nn.Module] = None) -> None:
        """Comb (and verify) the student, measure the latency table, build
        cost model, gates and scorer; restore ``state`` (a resumed run:
        ``base`` is the original student when the checkpoint's student was
        shrunk, see :class:`~cpd_mm.prune.CPDRunner`)."""
        physical = bool(state and state.get('physical'))
        if physical and base is None:
            raise ValueError(
                'CPD: the checkpoint holds a student that was physically '
                'shrunk during the run; resume it with CPDRunner '
                "(runner_type='CPDRunner', as tools/train.py does), which "
                'rebuilds the smaller student before the DDP wrap')
        original = base if physical else self.student
        self.base = comb_model(original, input_shape=self.input_shape,
                               exclude=self.exclude, verify=state is None,
                               logger=self._info)
        preflight.sync_verification(self, state)
        table = preflight.latency_table(self, original) \
            if self.target == 'latency' else None
        self.cost = CostModel(original, self.base, table)
        self.kept = np.ones(self.base.num_channels, dtype=bool)
        self.saved, self.physical = [], False
        if state is not None:
            self._restore(state)
        self.physical = physical
        self._attach(probes=int((state or {}).get('scorer', {}).get(
            'probes', 0)))
        if state is not None and state.get('scorer'):
            self.scorer.load_state_dict(self._scorer_state(state['scorer']))
        self._set_kept(self.kept)
        preflight.report(self)
        preflight.check_reachable(self)

    def _attach(self, probes=0):
        """Comb of the student as it is now, its map to ``base``, gates
        and scorer on it."""
        if self.gates is not None:
            self.gates.remove()
        if self.scorer is not None:
            self.scorer.remove()
        if self.physical:
            self.comb = comb_model(self.student, input_shape=self.input_shape,
                                   verify=False)
            self.to_base = map_channels(self.base, self.kept, self.comb)
        else:
            self.comb, self.to_base = self.base, np.arange(
                self.base.num_channels)
        # gates are needed where channels are masked but present, and for
        # the finite-difference probe
        if self.shrink != 'step' or self.importance == 'hessian_fd':
            self.gates = ChannelGates(self.student, self.comb)
        else:
            self.gates = None
        self.scorer = ImportanceAccumulator(
            self.student, self.comb, self.importance, self.seed,
            reduce=(lambda t: all_reduce(t, op='sum'))
            if is_distributed() else None)
        self.scorer._probes = probes
        self.scorer.find_unscored(self.student, example_input(
            self.comb, next(iter(self.student.parameters()))))
        self._scoring = True

    @property
    def unscored(self) -> np.ndarray:
        """Base channels no gradient scores (layers that do not train),
        the same on every rank; they are never removed."""
        out = np.zeros(self.base.num_channels, dtype=bool)
        out[self.to_base[self.scorer.unscored]] = True
        out[self.to_base[self.comb.frozen_channels]] = True
        if is_distributed():  # (a layer only one rank saw not training)
            t = torch.as_tensor(out.astype(np.float32))
            all_reduce(t, op='sum')
            out = t.numpy() > 0
        return out

    # ---------------------------------------------------------- metrics
    def _set_kept(self, kept):
        self.kept = kept
        if self.gates is not None:
            self.gates.set_kept(kept[self.to_base])
        self._params, self._flops = self.cost.measure(kept)
        self._value = self.cost.evaluate(kept, self.target)

    def sparsity(self) -> float:
        """Sparsity of the deployed structure in the target's metric."""
        return 1.0 - self._value / self.cost.total(self.target)

    @property
    def finished(self) -> bool:
        """The ramp is over and the target reached: no more pruning."""
        return self._last_iter >= self.end_iter and \
            self.sparsity() >= self.target_sparsity - 1e-9

    def metrics(self) -> dict:
        """Scalars to log every iteration (host values, no device sync)."""
        out = dict(cpd_sparsity=self.sparsity(),
                   cpd_params_M=self._params / 1e6,
                   cpd_flops_ratio=self._flops / self.cost.total_flops,
                   cpd_active_channels=int(self.kept.sum()))
        if self.target == 'latency':
            out['cpd_latency_ms'] = self._value
        return out

    # ---------------------------------------------------------- training
    @property
    def needs_loss(self) -> bool:
        """:meth:`before_iter` needs the batch's loss (finite-difference
        probes)."""
        return self._scoring and self.scorer.needs_loss

    def before_iter(self, loss_fn: Callable[[], torch.Tensor],
                    module: Optional[nn.Module] = None) -> None:
        """Probe the loss of the coming batch (``importance='hessian_fd'``;
        ``module``: the one whose buffers its forward writes)."""
        if self.needs_loss:
            self.scorer.probe(self.gates, loss_fn, module=module)

    def after_iter(self, cur: int, training: Optional[TrainingState] = None,
                   inv_scale=None) -> bool:
        """Close iteration ``cur`` (1-based): fold its scores; prune (and
        shrink) when a step is due. Returns whether the masks changed."""
        if self._scoring:
            self.scorer.step(inv_scale)
        self._last_iter = cur
        changed = False
        if cur >= self.begin_iter and \
                (cur - self.begin_iter) % self.interval == 0 and \
                self.sparsity() < self.target_sparsity - 1e-9:
            changed = self._prune_step(cur, training or TrainingState())
        if self._scoring and self.finished:
            self._scoring = False
            if self.shrink == 'end' and not self.physical:
                self._shrink(training or TrainingState(), cur)
            self.scorer.remove()  # no scoring cost for the rest of the run
            if self.physical and self.gates is not None:
                self.gates.remove()
                self.gates = None
            self._info(f'CPD: target reached at iter {cur}; importance '
                       'hooks removed' + (' and the student is pruned'
                                          if self.physical else ''))
        return changed

    def _prune_step(self, cur, training):
        goal = sparsity_at(cur, self.begin_iter, self.end_iter,
                           self.target_sparsity)
        if goal <= self.sparsity():
            return False
        scores = np.zeros(self.base.num_channels)
        scores[self.to_base] = self.scorer.current(self.steps)
        if self.memory_norm:
            scores = normalise_by_memory(scores, self.base, self.kept)
        total = self.cost.total(self.target)
        self._set_kept(select_channels(
            scores, self.kept, self.base, self.cost, (1 - goal) * total,
            self.target, self.min_channels, self.round_to,
            protected=self.unscored, max_removal=self.max_removal,
            ranking=self.ranking))
        self.scorer.reset()
        self.steps += 1
        self._info(
            f'CPD step {self.steps} at iter {cur}: sparsity '
            f'{self.sparsity():.3f} (goal {goal:.3f}), params '
            f'{self._params / 1e6:.3f} M, active channels '
            f'{int(self.kept.sum())}/{self.base.num_channels}')
        if self.shrink == 'step':
            self._shrink(training, cur)
        return True

    def _shrink(self, training, cur):
        """Remove the masked channels from the student in place, once the
        pruned copy is checked to compute what the gated student does."""
        kept_now = self.kept[self.to_base]
        if kept_now.all():
            return
        gates = self.gates or ChannelGates(self.student, self.comb)
        gates.set_kept(kept_now)
        try:
            check_pruned(self.student, self.comb, gates, kept_now,
                         self.plan(), dict(iter=cur), osp.join(
                             self.work_dir, f'shrunk_iter_{cur}.pth'),
                         self._info)
        finally:
            gates.remove()
        self.gates = None
        owner = training.owner or self.student
        prefix = next(n for n, m in owner.named_modules()
                      if m is self.student)
        comb, kept = self.comb, kept_now
        base_keep = base_keep_from_comb(self.base, self.kept)

        def surgery(model):
            prune_model(model.get_submodule(prefix) if prefix else model,
                        comb, kept)
            if hasattr(model, 'follow_student_shrink'):
                model.follow_student_shrink(base_keep)
        shrink_student(owner, surgery, prefix + '.' if prefix else '',
                       training.optimizers, training.averaged, self._info)
        if training.rewrap is not None:
            training.rewrap()
        self.physical = True
        self._attach(self.scorer._probes)
        n = sum(p.numel() for p in self.student.parameters())
        self._info(f'CPD: student shrunk at iter {cur}: {n / 1e6:.3f} M '
                   'params')

    # ---------------------------------------------------------- results
    def plan(self) -> dict:
        """The plan of the current masks over the original student."""
        plan = make_plan(self.base, self.kept)
        plan['model'] = type(self.student).__name__
        return plan

    def save_pruned(self, path: str, meta: Optional[dict] = None) -> str:
        """Write the physically pruned student to ``path`` (its plan in
        ``meta['cpd_plan']``), once checked against the gated one (see
        :func:`~cpd_mm.prune.snapshot.check_pruned`)."""
        kept_now = self.kept[self.to_base]
        meta = dict(meta or {}, sparsity=self.sparsity(), target=self.target)
        check_pruned(self.student, self.comb, self.gates, kept_now,
                     self.plan(), meta, path, self._info, write=True)
        return path

    def state_dict(self) -> dict:
        """Masks, scores (over the original channels) and step count."""
        sc = self.scorer.state_dict()
        if sc.get('scores'):
            full = np.zeros(self.base.num_channels)
            full[self.to_base] = sc['scores']
            sc['scores'] = full.tolist()
        sc['unscored'] = [int(i) for i in
                          self.to_base[np.asarray(sc['unscored'], np.int64)]]
        return dict(
            removed=[int(i) for i in np.nonzero(~self.kept)[0]],
            num_channels=int(self.base.num_channels), steps=int(self.steps),
            saved=[float(s) for s in self.saved], scorer=sc,
            verified_frozen=dict(self.verified_frozen),
            physical=bool(self.physical), plan=self.plan())

    def _scorer_state(self, sc):
        """A checkpointed scorer state (over the original channels) for
        the scorer of the student as it is now."""
        sc = dict(sc)
        if sc.get('scores'):
            sc['scores'] = np.asarray(sc['scores'])[self.to_base].tolist()
        where = np.full(self.base.num_channels, -1)
        where[self.to_base] = np.arange(self.to_base.size)
        un = where[np.asarray(sc.get('unscored', []), np.int64)]
        sc['unscored'] = [int(i) for i in un[un >= 0]]
        return sc

    def _restore(self, state):
        if state['num_channels'] != self.base.num_channels:
            raise ValueError(
                f'CPD: the checkpoint was pruned on a model with '
                f'{state["num_channels"]} channels, this one has '
                f'{self.base.num_channels}')
        kept = np.ones(self.base.num_channels, dtype=bool)
        kept[np.asarray(state['removed'], dtype=np.int64)] = False
        if (~kept & self.base.frozen_channels).any():
            raise ValueError('CPD: the checkpoint removed channels that this '
                             'model freezes; was it made with another '
                             'version of cpd_mm or another exclude list?')
        self.kept = kept
        self.steps = int(state['steps'])
        self.saved = list(state.get('saved', []))


__all__ = ['PruningSession', 'TrainingState', 'PrunedCheckError',
           'SHRINK_MODES']
