"""The arms of ``selection_grid.py``: one way each of choosing the channels
that go, all run by the same plain PyTorch loop from the same start, for
any task module (``selection_task_<task>.py``: data, model, loss, metric;
see ``selection_task_cls.py``).

* ``train``: the task's ``optimizer(params, lr)`` where it has one (SGD,
  momentum 0.9, weight decay 5e-4 otherwise), cosine to zero, the task's
  augmented batches; an optional ``step_hook(it, loss_fn)`` runs
  after every backward (cpd_mm's scoring and pruning steps hang there);
* ``cpd_prune``: what ``CPDPruningHook`` does in a runner (comb, gates,
  importance accumulated every iteration, a pruning step every ``interval``
  iterations on a linear ramp, ``select_channels`` towards a latency target
  predicted by the measured latency table), then surgery;
* ``tp_prune``: Torch-Pruning's MetaPruner (global pruning) with its group
  Taylor, Hessian (OBD) or magnitude importance, one shot before
  fine-tuning;
* ``Timer``: onnxruntime, CPU, one thread, sessions timed interleaved.
"""
import copy
import os.path as osp
import tempfile

import numpy as np
import torch

# CPDPruningHook's defaults
CPD_OPTIONS = dict(importance='hessian', ranking='cost', memory_norm=False,
                   reduce='sum')


def train(task, model, data, epochs, lr, seed, batch=None, step_hook=None):
    """Train in place; ``step_hook(it, loss_fn)`` after each backward,
    before the update (``loss_fn()`` recomputes the batch's loss)."""
    batch = batch or task.DEFAULTS['batch']
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if hasattr(task, 'optimizer'):
        opt = task.optimizer(params, lr)
    else:
        opt = torch.optim.SGD(params, lr, momentum=0.9, weight_decay=5e-4)
    total = epochs * (len(data[0]) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    model.train()
    it = 0
    for _ in range(epochs):
        for xb, yb in task.batches(data, batch, gen):
            loss = task.loss(model, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            it += 1
            if step_hook is not None:
                step_hook(it, lambda xb=xb, yb=yb: task.loss(model, xb, yb))
            opt.step()
            sched.step()
    return model


# ------------------------------------------------------------ cpd_mm
def _sites_per_channel(comb, scorer):
    """How many gated layers (gate sites) read each channel's gate."""
    n = np.zeros(comb.num_channels)
    for _, _, _, chans in scorer.params:
        np.add.at(n, np.unique(chans[chans >= 0]), 1)
    for _, chans in scorer.activation_sites.values():
        np.add.at(n, np.unique(chans[chans >= 0]), 1)
    return np.maximum(n, 1)


def cpd_prune(task, model, data, target, epochs, lr, seed, round_to, table,
              importance='hessian', ranking='cost', memory_norm=False,
              reduce='sum', interval=16, ramp=0.4):
    """Fine-tune ``model`` for ``epochs`` while pruning it as
    ``CPDPruningHook(target='latency', target_sparsity=target, ...)`` does
    (ramp over the first ``ramp`` of the iterations); returns the
    physically pruned model and its plan.

    ``reduce='mean'`` divides a channel's score by the number of gated
    layers that read it (Torch-Pruning's mean over coupled layers) instead
    of the sum the gate gradient gives."""
    from cpd_mm.comb import ChannelGates, comb_model
    from cpd_mm.prune import (CostModel, ImportanceAccumulator, make_plan,
                              prune_model, select_channels)
    from cpd_mm.prune.importance import normalise_by_memory
    from cpd_mm.prune.schedule import sparsity_at
    comb = comb_model(model, input_shape=(1, 3, *task.SHAPE))
    cost = CostModel(model, comb, table)
    gates = ChannelGates(model, comb)
    scorer = ImportanceAccumulator(model, comb, importance, seed)
    per_site = _sites_per_channel(comb, scorer)
    unscored = scorer.find_unscored(model, task.example())
    total = cost.total('latency')
    end = int(ramp * epochs * (len(data[0]) // task.DEFAULTS['batch']))
    state = dict(kept=np.ones(comb.num_channels, dtype=bool), steps=0,
                 scoring=True)

    def step_hook(it, loss_fn):
        if not state['scoring']:  # the ramp is over: no scoring cost
            return
        if importance == 'hessian_fd':
            scorer.probe(gates, loss_fn)
        scorer.step()
        if it % interval:
            return
        goal = sparsity_at(it, interval, end, target)
        if goal <= 1 - cost.latency(state['kept']) / total:
            return
        scores = scorer.current(state['steps'])
        if reduce == 'mean':
            scores = scores / per_site
        if memory_norm:
            scores = normalise_by_memory(scores, comb, state['kept'])
        state['kept'] = select_channels(
            scores, state['kept'], comb, cost, (1 - goal) * total,
            'latency', 1, round_to, protected=unscored, max_removal=0.8,
            ranking=ranking)
        gates.set_kept(state['kept'])
        scorer.reset()
        state['steps'] += 1
        if it >= end:
            state['scoring'] = False
            scorer.remove()

    train(task, model, data, epochs, lr, seed, step_hook=step_hook)
    scorer.remove()
    kept = state['kept']
    plan = make_plan(comb, kept, model)
    gates.remove()
    prune_model(model, comb, kept)
    return model, plan, dict(predicted_sparsity=1 - cost.latency(kept) /
                             total, steps=state['steps'])


def latency_table(task, model):
    from cpd_mm.deploy.latency_table import LatencyTable
    return LatencyTable.build(model, (1, 3, *task.SHAPE), threads=1)


# ------------------------------------------------------------ Torch-Pruning
TP_IMPORTANCES = ('taylor', 'hessian', 'magnitude')


def tp_statistics(task, model, data, kind, seed, batches_=4, samples=64):
    """What TP's importance needs from the loss, from the start model:
    summed gradients over ``batches_`` training batches ('taylor') or
    per-sample squared gradients summed over ``samples`` training images
    ('hessian', TP's OBD estimate)."""
    if kind == 'magnitude':
        return None
    m = copy.deepcopy(model).eval()  # eval: no BN statistics move
    gen = torch.Generator().manual_seed(seed)
    stats = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    size, count = (task.DEFAULTS['batch'], batches_) if kind == 'taylor' \
        else (1, samples)
    for b, (xb, yb) in enumerate(task.batches(data, size, gen)):
        if b == count:
            break
        m.zero_grad()
        task.loss(m, xb, yb).backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                stats[n] += p.grad if kind == 'taylor' else p.grad.pow(2)
    return stats


def tp_prune(task, model, kind, ratio, stats, round_to, **imp_options):
    """A pruned copy of ``model``: TP's MetaPruner, global pruning,
    ``pruning_ratio=ratio``, the classifier ignored; the importance with
    TP's defaults (mean over the group, mean-normalised) unless
    ``imp_options`` (``group_reduction``, ``normalizer``) say otherwise.
    Returns ``(model, history)``."""
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    imp = dict(taylor=tp.importance.GroupTaylorImportance,
               hessian=tp.importance.GroupHessianImportance,
               magnitude=tp.importance.GroupMagnitudeImportance)[kind](
                   **imp_options)
    if kind == 'taylor':
        for n, p in m.named_parameters():
            p.grad = stats[n].clone()
    elif kind == 'hessian':
        # what TP's accumulate_grad is meant to hold (summed squared
        # per-sample gradients, a count); 1.6's keeps only the last sample
        # (it tests `name in` a dict keyed by parameters), so it is filled
        # here from the sums, as intended
        imp.zero_grad()
        for n, p in m.named_parameters():
            p.grad = torch.zeros_like(p)
            imp._accu_grad[p] = stats[n].clone()
            imp._counter[p] = 1
    pruner = tp.pruner.MetaPruner(
        m, task.example(), importance=imp, pruning_ratio=ratio,
        global_pruning=True, round_to=round_to,
        ignored_layers=task.tp_ignored_layers(m),
        forward_fn=getattr(task, 'tp_forward', task.forward))
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m, pruner.pruning_history()


# ------------------------------------------------------------ latency
class Timer:
    """onnxruntime sessions (CPU, one thread), timed interleaved."""

    def __init__(self, task):
        self.task = task
        self.tmp = tempfile.TemporaryDirectory()
        self.n = 0

    def session(self, model):
        from cpd_mm.deploy import create_session, export_onnx
        self.n += 1
        path = osp.join(self.tmp.name, f'm{self.n}.onnx')
        export_onnx(copy.deepcopy(model).eval(), path, self.task.SHAPE,
                    force=True)
        return create_session(path, ['CPUExecutionProvider'], threads=1)

    def time(self, sessions, runs=300, warmup=30):
        from cpd_mm.deploy import benchmark_sessions
        x = self.task.example().numpy().astype(np.float32)
        return [s['median_ms'] for s in benchmark_sessions(
            sessions, x, runs, warmup, progress=False)]
