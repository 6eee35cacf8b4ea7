"""What comb's self-verification costs, relative to the trace.

    OMP_NUM_THREADS=1 python benchmarks/verify_cost.py --runs 7 \\
        --json benchmarks/verify_cost.json

On ResNet-50 and MobileNetV2 (torchvision) and DeiT-S (mmpretrain) at
224x224, in this process, on one thread, interleaved run by run:
``comb_model(verify=False)`` (the trace) and ``comb_model()`` (trace plus
verification: a copy with generic weights, then two complementary plans,
each a gated and a physically pruned forward). The budget is
``with verification / trace <= 3``; the factor is taken per run (the two
calls next to each other) and reported as median, min and max, in wall
time and in CPU time of this process (CPU time moves less when other jobs
share the machine; wall time is what the budget means on a quiet one).

Also timed: the generic copy alone, as verification makes it (weights that
are already generic kept) and with every weight drawn anew (what the tests
and tools/check_pruning.py use). ``--breakdown`` then runs verification
again with its parts timed (CPU time per verification, relative to the
trace): the generic copy, building gates, the gated and the pruned
forwards, surgery, and what runs only when a plan fails (plain runs for
determinism, the float64 re-check). ``--json out.json`` writes the rows
with the load average before and after (a loaded machine is visible).
"""
import argparse
import collections
import contextlib
import json
import os
import os.path as osp
import statistics
import time

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def models():
    import torchvision
    from mmengine.config import Config
    from mmengine.config.utils import _get_package_and_cfg_path
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import get_installed_path
    import cpd_mm  # noqa: F401

    def mm(name):
        pkg, rel = _get_package_and_cfg_path(name)
        cfg = Config.fromfile(osp.join(get_installed_path(pkg), '.mim',
                                       'configs', rel))
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        model.init_weights()
        return model

    yield 'ResNet-50 (torchvision)', torchvision.models.resnet50()
    yield 'MobileNetV2 (torchvision)', torchvision.models.mobilenet_v2()
    yield 'DeiT-S (mmpretrain)', mm(
        'mmpretrain::deit/deit-small_4xb256_in1k.py')


def timed(fn):
    """``(wall seconds, CPU seconds of this process, result)``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def spread(xs):
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


@contextlib.contextmanager
def parts_timed(acc):
    """Time verification's parts (CPU seconds, summed into ``acc``) by
    wrapping the functions it calls, restored afterwards."""
    from cpd_mm.comb import plan_check, verify
    gated = {}  # id -> model, for the models that carry gates (kept
    # alive: a pruned copy must not inherit a freed one's id)

    def wrap(mod, name, part=None):
        f = getattr(mod, name)

        def timed_call(*args, **kwargs):
            if part is None:  # a forward: gated or pruned?
                key = 'forward, gated' if id(args[0]) in gated \
                    else 'forward, pruned'
            else:
                key = part
            c = time.process_time()
            try:
                return f(*args, **kwargs)
            finally:
                acc[key] += time.process_time() - c
        return f, timed_call

    def rig(self, model):
        out = real_rig(self, model)
        gated[id(model)] = model
        return out

    wraps = [(verify, 'generic_copy', 'generic copy'),
             (verify, '_baseline', 'plain runs (only when a plan fails)'),
             (plan_check.PlanChecker, '_float64',
              'float64 model (only near the tolerance)'),
             (plan_check, 'ChannelGates', 'gates: build'),
             (plan_check, 'structural_twin', 'gates: twin for pruned copies'),
             (plan_check, 'structural_copy', 'surgery: structural copy'),
             (plan_check, 'prune_model', 'surgery: prune_model'),
             (plan_check, 'relative_difference', 'compare outputs'),
             (plan_check, 'model_outputs', None)]
    real_rig = plan_check.PlanChecker._rig
    saved = []
    for mod, name, part in wraps:
        f, g = wrap(mod, name, part)
        saved.append((mod, name, f))
        setattr(mod, name, g)
    plan_check.PlanChecker._rig = rig
    try:
        yield
    finally:
        plan_check.PlanChecker._rig = real_rig
        for mod, name, f in saved:
            setattr(mod, name, f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--breakdown', action='store_true',
                   help='time verification\'s parts (extra runs)')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    from cpd_mm.comb import comb_model, generic_copy, verify_comb
    torch.set_num_threads(1)
    shape = (1, 3, args.size, args.size)
    load_before = os.getloadavg()
    rows = []
    for name, model in models():
        model.eval()
        comb_model(model, input_shape=shape)  # warm-up (allocator, caches)
        wall = collections.defaultdict(list)
        cpu = collections.defaultdict(list)
        comb = None
        for _ in range(args.runs):
            for key, verify in (('trace', False), ('full', True)):
                w, c, comb = timed(lambda: comb_model(
                    model, input_shape=shape, verify=verify))
                wall[key].append(w)
                cpu[key].append(c)
        factor = [f / t for f, t in zip(wall['full'], wall['trace'])]
        cpu_factor = [f / t for f, t in zip(cpu['full'], cpu['trace'])]
        copy_s = statistics.median(timed(lambda: generic_copy(
            model, redraw_weights=False))[0] for _ in range(args.runs))
        full_copy_s = statistics.median(timed(lambda: generic_copy(model))[0]
                                        for _ in range(args.runs))
        v = comb.verification
        row = dict(model=name, input=args.size,
                   trace_s=statistics.median(wall['trace']),
                   with_verification_s=statistics.median(wall['full']),
                   factor=spread(factor),
                   trace_cpu_s=statistics.median(cpu['trace']),
                   with_verification_cpu_s=statistics.median(cpu['full']),
                   cpu_factor=spread(cpu_factor),
                   generic_copy_s=copy_s, full_redraw_s=full_copy_s,
                   checks=v.checks, frozen=v.frozen, weights=v.weights)
        print(f'{name:28s} trace {row["trace_s"]:.3f} s, with verification '
              f'{row["with_verification_s"]:.3f} s: {_fmt(factor)} '
              f'(CPU time {_fmt(cpu_factor)}; generic copy {copy_s:.3f} s, '
              f'every weight drawn {full_copy_s:.3f} s; {v.checks} checks, '
              f'{len(v.frozen)} frozen)', flush=True)
        if args.breakdown:
            row['breakdown_cpu_s'] = breakdown(model, shape, args.runs,
                                               row['trace_cpu_s'],
                                               comb_model, verify_comb)
        rows.append(row)
    out = dict(torch=torch.__version__, threads=1, runs=args.runs,
               load_average_before=load_before,
               load_average_after=os.getloadavg(), rows=rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return out


def _fmt(factors):
    s = spread(factors)
    return f'{s["median"]:.2f}x (min {s["min"]:.2f}, max {s["max"]:.2f})'


def breakdown(model, shape, runs, trace_cpu, comb_model, verify_comb):
    """CPU seconds per verification, by part (see :func:`parts_timed`):
    the median over runs of each part (a garbage-collector pause in one
    run does not move it), 'rest' what no part covers."""
    comb = comb_model(model, input_shape=shape, verify=False)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    per_run = []
    for _ in range(runs):
        acc = collections.Counter()
        with parts_timed(acc):
            total = timed(lambda: verify_comb(model, comb, x))[1]
        acc['rest'] = total - sum(acc.values())
        acc['total'] = total
        per_run.append(acc)
    keys = sorted({k for acc in per_run for k in acc})
    parts = {k: statistics.median(acc[k] for acc in per_run) for k in keys}
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f'    {k:42s} {v * 1000:7.1f} ms  {v / trace_cpu:.2f} x trace')
    return parts


if __name__ == '__main__':
    main()
