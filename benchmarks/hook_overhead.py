"""Cost of CPDPruningHook per training iteration, measured in one process.

    python benchmarks/hook_overhead.py [--models resnet vit] [--iters 60]

With ``shrink='step'`` (the default) see :func:`measure_shrink`. With
``shrink='never'`` (masks only, :func:`measure`) the same training step
(data preprocessing, forward, backward, SGD update) runs on the same fixed
batch, alternating blocks of 10 iterations without and with the hook's
per-iteration work:

* ``pruning``: while pruning, gates at 50% of every prunable group
  (output gates, masked norms where channels are removed) and the
  gradient hooks that accumulate the Hessian importance, folded once per
  iteration as the hook does (pruning steps excluded: they run once per
  interval);
* ``after``: once the target is reached, gates only (the hook removes its
  score hooks);
* ``hessian_fd`` (unless ``--no-fd``): pruning with
  ``importance='hessian_fd'``, whose probe runs two more gated
  forward/backward passes of the batch per iteration.

Models: ``resnet`` is the demo classifier (configs/demo/resnet18_demo-cls.py,
32x32, BatchNorm), ``vit`` MMPretrain's DeiT-tiny at 64x64 (LayerNorm,
attention). Reports medians and relative overheads; the JSON keeps both.
With one thread (``OMP_NUM_THREADS=1``) iterations are timed in process
CPU time, which other processes on a shared machine do not inflate.
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch

MODELS_ = {
    'resnet': ('configs/demo/resnet18_demo-cls.py', 32, 64, 6),
    'vit': ('mmpretrain::deit/deit-tiny_4xb256_in1k.py', 64, 16, 1000),
}


def build(name):
    import cpd_mm  # noqa: F401
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    path, size, batch, classes = MODELS_[name]
    if '::' in path:  # a config shipped inside an OpenMMLab package
        import os.path as osp
        from mmengine.config.utils import _get_package_and_cfg_path
        from mmengine.utils import get_installed_path
        pkg, rel = _get_package_and_cfg_path(path)
        path = osp.join(get_installed_path(pkg), '.mim', 'configs', rel)
    cfg = Config.fromfile(path)
    init_default_scope('mmpretrain')
    if name == 'vit':
        cfg.model.backbone.img_size = size
        cfg.model.pop('train_cfg', None)  # no mixup: one fixed batch
    model = MODELS.build(cfg.model)
    model.train()
    optim = build_optim_wrapper(
        model, dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
    from mmpretrain.structures import DataSample
    x = torch.randint(0, 255, (batch, 3, size, size)).float()
    samples = [DataSample().set_gt_label(i % classes) for i in range(batch)]
    return model, optim, dict(inputs=list(x), data_samples=samples), size


def measure(name, iters, with_fd=True):
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import ChannelGates, ImportanceAccumulator
    model, optim, data, size = build(name)
    comb = comb_model(model, input_shape=(1, 3, size, size))
    kept = np.ones(comb.num_channels, bool)
    for g in comb.prunable_groups:
        free = np.nonzero(~g.frozen)[0]
        kept[g.channels[free[::2]]] = False

    def loss_fn():  # the training loss of the batch, as train_step has it
        batch = model.data_preprocessor(data, True)
        return model.parse_losses(model._run_forward(batch, mode='loss'))[0]

    # CPU time of this process: with one thread it counts the work, not the
    # time other processes hold the core (a shared machine)
    clock = time.process_time if torch.get_num_threads() == 1 \
        else time.perf_counter

    def block(k, scorer=None, gates=None):
        ts = []
        for _ in range(k):
            t = clock()
            if gates is not None:  # hessian_fd: two more gated passes
                scorer.probe(gates, loss_fn)
            model.train_step(data, optim)
            if scorer is not None:
                scorer.step()
            ts.append(clock() - t)
        return ts

    for _ in range(5):
        block(1)  # warm-up
    plain, pruning, after, fd = [], [], [], []
    for _ in range(max(iters // 10, 1)):
        plain += block(10)
        gates = ChannelGates(model, comb)
        gates.set_kept(kept)
        scorer = ImportanceAccumulator(model, comb, 'hessian')
        pruning += block(10, scorer)
        scorer.remove()
        if with_fd:
            scorer = ImportanceAccumulator(model, comb, 'hessian_fd')
            fd += block(10, scorer, gates)
            scorer.remove()
        after += block(10)
        gates.remove()
    a, b, c = (statistics.median(v) for v in (plain, pruning, after))
    res = dict(model=f'{name} ({size}x{size}, batch {len(data["inputs"])})',
               threads=torch.get_num_threads(), iters=len(plain),
               clock=clock.__name__,
               median_s_without=a, median_s_pruning=b, median_s_after=c,
               overhead_pruning=b / a - 1, overhead_after=c / a - 1)
    print(f'{res["model"]}: median iteration without hook {a * 1e3:.1f} ms,'
          f' while pruning {b * 1e3:.1f} ms ({100 * (b / a - 1):+.1f}%),'
          f' after {c * 1e3:.1f} ms ({100 * (c / a - 1):+.1f}%)')
    if fd:
        d = statistics.median(fd)
        res.update(median_s_pruning_hessian_fd=d,
                   overhead_pruning_hessian_fd=d / a - 1)
        print(f'  importance=hessian_fd while pruning {d * 1e3:.1f} ms '
              f'({100 * (d / a - 1):+.1f}%)')
    return res


def measure_shrink(name, iters):
    """``shrink='step'`` (the default): while pruning the student carries
    no gates, only the score hooks; after the target nothing. Three
    interleaved comparisons, each on the same fixed batch:

    * ``while_pruning``: the score hooks on the full model and on the
      half-pruned one, against the same model without them;
    * ``after_vs_own_checkpoint``: the student the session shrank, against
      the same pruned structure built from its plan and loaded with its
      weights (what training the pruned model from its own checkpoint
      costs), each with its own SGD;
    * ``step_s``: CPU time of one pruning step (selection, check, shrink of
      weights and optimizer state, re-comb), to divide by the interval.
    """
    from mmengine.optim import build_optim_wrapper
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import (ImportanceAccumulator, PruningSession,
                              TrainingState, apply_plan)
    model, optim, data, size = build(name)
    clock = time.process_time if torch.get_num_threads() == 1 \
        else time.perf_counter

    def blocks(models, k=10, rounds=None):
        """Alternate k-iteration blocks of each ``(model, optim, before,
        after)``; per entry the list of iteration times."""
        out = [[] for _ in models]
        for _ in range(rounds or max(iters // k, 1)):
            for i, (m, o, setup, teardown) in enumerate(models):
                state = setup() if setup else None
                for _ in range(k):
                    t = clock()
                    m.train_step(data, o)
                    if state is not None:
                        state.step()
                    out[i].append(clock() - t)
                if teardown:
                    teardown(state)
        return out

    def scoring_overhead(key):
        """The score hooks on ``model`` as it is now, against none."""
        comb = comb_model(model, input_shape=(1, 3, size, size),
                          verify=False)
        plain, scored = blocks([
            (model, optim, None, None),
            (model, optim, lambda: ImportanceAccumulator(model, comb,
                                                         'hessian'),
             lambda sc: sc.remove())])
        a, b = statistics.median(plain), statistics.median(scored)
        res.update({f'{key}_median_s_without': a,
                    f'{key}_median_s_scoring': b,
                    f'overhead_while_pruning_{key}': b / a - 1})

    for _ in range(5):
        model.train_step(data, optim)  # warm-up
    res = dict(model=f'{name} ({size}x{size}, batch {len(data["inputs"])})',
               threads=torch.get_num_threads(), clock=clock.__name__)
    scoring_overhead('full')
    # prune to half the parameters in four steps, scored by real gradients
    session = PruningSession(model, target_sparsity=0.5, interval=1,
                             begin_iter=1, end_iter=4,
                             input_shape=(1, 3, size, size))
    session.setup()
    steps = []
    for it in range(1, 5):
        model.train_step(data, optim)
        t = clock()
        session.after_iter(it, TrainingState(optimizers=[optim.optimizer]))
        steps.append(clock() - t)
    assert session.finished and session.physical
    res.update(step_s=statistics.median(steps[:-1]),
               final_step_s=steps[-1], sparsity=session.sparsity())
    scoring_overhead('half')
    # the same structure built from the plan, loaded with the weights
    twin = build(name)[0]
    apply_plan(twin, session.plan())
    twin.load_state_dict(model.state_dict())
    twin_optim = build_optim_wrapper(
        twin, dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)))
    for _ in range(5):
        twin.train_step(data, twin_optim)
    after, own = blocks([(model, optim, None, None),
                         (twin, twin_optim, None, None)])
    a, b = statistics.median(after), statistics.median(own)
    res.update(after_median_s=a, own_checkpoint_median_s=b,
               after_vs_own_checkpoint=a / b)
    print(f'{res["model"]} shrink=step: while pruning '
          f'{100 * res["overhead_while_pruning_full"]:+.1f}% (full), '
          f'{100 * res["overhead_while_pruning_half"]:+.1f}% (half); '
          f'a pruning step {res["step_s"] * 1e3:.0f} ms; after the target '
          f'{a * 1e3:.1f} ms vs {b * 1e3:.1f} ms from its own checkpoint '
          f'({a / b:.3f}x)')
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--models', nargs='+', default=list(MODELS_),
                   choices=list(MODELS_))
    p.add_argument('--iters', type=int, default=60)
    p.add_argument('--no-fd', action='store_true',
                   help="skip importance='hessian_fd' (its probe: two more "
                   'gated forward/backward passes per iteration)')
    p.add_argument('--json', default='benchmarks/hook_overhead.json')
    p.add_argument('--no-never', action='store_true',
                   help="skip shrink='never' (masks only, gates all run)")
    args = p.parse_args()
    out = []
    for m in args.models:
        res = dict(shrink_step=measure_shrink(m, args.iters))
        if not args.no_never:
            res['shrink_never'] = measure(m, args.iters, not args.no_fd)
        out.append(res)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
