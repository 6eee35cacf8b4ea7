"""Cost of CPDPruningHook per training iteration, measured in one process.

    python benchmarks/hook_overhead.py [--iters 60] [--json out.json]

Builds the demo classifier (configs/demo/resnet18_demo-cls.py) and runs the
same training step (data preprocessing, forward, backward, SGD update) on the
same fixed batch, alternating blocks without and with the hook's per-
iteration work: gate multiplications on every gated module output (masks at
50% sparsity), the gradient hooks that collect the Hessian importance, and
the hook's ``after_train_iter`` bookkeeping (pruning steps excluded: they
run once per interval). Reports medians and the relative overhead.
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--iters', type=int, default=60)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--json', default='benchmarks/hook_overhead.json')
    args = p.parse_args()
    import cpd_mm  # noqa: F401
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import ChannelGates, ImportanceAccumulator

    cfg = Config.fromfile('configs/demo/resnet18_demo-cls.py')
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    model.train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    from mmpretrain.structures import DataSample
    x = torch.randint(0, 255, (args.batch, 3, 32, 32)).float()
    samples = [DataSample().set_gt_label(i % 6) for i in range(args.batch)]
    data = dict(inputs=list(x), data_samples=samples)

    comb = comb_model(model, input_shape=(1, 3, 32, 32))
    kept = np.ones(comb.num_channels, bool)
    for g in comb.prunable_groups:
        free = np.nonzero(~g.frozen)[0]
        kept[g.channels[free[::2]]] = False

    def step():
        model.train_step(data, optim)

    def timed(n, with_hook):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            step()
            if with_hook:
                scorer.step()
            ts.append(time.perf_counter() - t)
        return ts

    for _ in range(5):
        step()  # warm-up
    plain, hooked = [], []
    for _ in range(args.iters // 10):
        plain += timed(10, False)
        gates = ChannelGates(model, comb)
        gates.set_kept(kept)
        scorer = ImportanceAccumulator(model, comb, 'hessian')
        hooked += timed(10, True)
        gates.remove()
        scorer.remove()
    a, b = statistics.median(plain), statistics.median(hooked)
    res = dict(model='demo ResNet-18 (32x32, batch %d)' % args.batch,
               threads=torch.get_num_threads(), iters=len(plain),
               median_s_without=a, median_s_with=b, overhead=b / a - 1)
    print(f'median iteration: without hook {a * 1e3:.1f} ms, with hook '
          f'{b * 1e3:.1f} ms, overhead {100 * (b / a - 1):+.1f}%')
    with open(args.json, 'w') as f:
        json.dump(res, f, indent=1)


if __name__ == '__main__':
    main()
