#!/usr/bin/env python
"""Does the latency table predict pruned models? ResNet-50 and DeiT-S.

For each model (MMPretrain, random weights, batch 1, 224x224):

1. build its :class:`cpd_mm.deploy.LatencyTable` (timed; a second build is
   timed too, to show the cache hit);
2. make pruned copies with cpd_mm (``comb_model`` + a keep-mask +
   ``prune_model``): every prunable group cut by the same fraction (25%,
   50%), kept widths rounded to multiples of 8, and non-uniform random
   cuts (each group keeps a random 30-100%, multiples of 8);
3. export the unpruned and the pruned models to ONNX and time them all in
   one process, interleaved run by run, with the table's settings;
4. compare ``table.predict_model(pruned)`` with the measured median: as
   predicted, and rescaled by (unpruned measured now / ``table.full_ms``),
   which removes a change of machine load between the table's build and
   this measurement.

Example::

    OMP_NUM_THREADS=1 python benchmarks/latency_table_validation.py \\
        --runs 100 --builds 3 --rebuild

On a shared machine other processes take time slices and pollute caches:
with one thread the CPU time of the timing thread is reported (it ignores
the time slices) next to the wall time, and the run says how much of the
wall time the thread got. Running it with a real-time priority
(``chrt -f 10 python ...``, as root) keeps other processes off its core.
"""
import argparse
import copy
import os
import os.path as osp
import sys
import tempfile
import time

import numpy as np
import torch

from cpd_mm.comb import comb_model
from cpd_mm.deploy import (LatencyTable, create_session, export_onnx,
                           model_complexity, write_json)
from cpd_mm.deploy.latency_table import METHODS
from cpd_mm.deploy.layer_timing import time_sessions
from cpd_mm.deploy.report import format_table
from cpd_mm.prune import CostModel, prune_model, select_channels

MODELS = {
    'resnet50': 'resnet50_8xb32_in1k',
    'deit-s': 'deit-small_4xb256_in1k',
}
INPUT = (1, 3, 224, 224)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=list(MODELS),
                   choices=list(MODELS))
    p.add_argument('--runs', type=int, default=100,
                   help='timed runs per model (interleaved)')
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--providers', nargs='+', help='onnxruntime providers '
                   '(default: the first one onnxruntime offers)')
    p.add_argument('--random-plans', type=int, default=2,
                   help='number of non-uniform random plans')
    p.add_argument('--rebuild', action='store_true',
                   help='measure the table even if it is cached')
    p.add_argument('--builds', type=int, default=1,
                   help='tables per model: the first from the cache unless '
                   '--rebuild, the others measured anew (build-to-build '
                   'spread of the prediction)')
    p.add_argument('--json',
                   default='benchmarks/latency_table_validation.json',
                   help='write the results here (replaced)')
    args = p.parse_args(argv)
    if min(args.runs, args.threads, args.builds) < 1 or args.warmup < 0:
        p.error('need --runs, --threads, --builds >= 1 and --warmup >= 0')
    return args


def build(name):
    from mmpretrain import get_model
    torch.manual_seed(0)
    return get_model(MODELS[name], pretrained=False, device='cpu').eval()


def keep_mask(comb, fraction_of, round_to=8):
    """Keep-mask where group g keeps ``fraction_of(g)`` of its channels,
    rounded to a multiple of ``round_to`` (at least one multiple); frozen
    channels are always kept, the others are kept from the front."""
    kept = np.ones(comb.num_channels, dtype=bool)
    for g in comb.prunable_groups:
        n = int(round(fraction_of(g) * g.size / round_to)) * round_to
        n = min(g.size, max(round_to, n))
        if n >= g.size:
            continue
        free = g.channels[~g.frozen]
        drop = g.size - max(n, int(g.frozen.sum()))
        kept[free[len(free) - drop:]] = False
    return kept


def plans(comb, n_random, seed=0, cost=None):
    rng = np.random.default_rng(seed)
    out = {'uniform-25%': keep_mask(comb, lambda g: 0.75),
           'uniform-50%': keep_mask(comb, lambda g: 0.5)}
    if cost is not None:
        # what the hook selects with target='latency' at 50% (scores drawn
        # at random: the latency of the structure is what is validated)
        full = np.ones(comb.num_channels, dtype=bool)
        out['latency-50%'] = select_channels(
            rng.random(comb.num_channels), full, comb, cost,
            0.5 * cost.total_latency, 'latency', round_to=8)
    for i in range(n_random):
        keep = {g.name: rng.uniform(0.3, 1.0) for g in comb.prunable_groups}
        out[f'random-{i}'] = keep_mask(comb, lambda g: keep[g.name])
    return out


def run_model(name, args, tmp):
    print(f'== {name} ({MODELS[name]}), input {list(INPUT)}')
    model = build(name)
    start = time.perf_counter()
    table = LatencyTable.build(model, INPUT, threads=args.threads,
                               providers=args.providers, rebuild=args.rebuild)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    LatencyTable.build(model, INPUT, threads=args.threads,
                       providers=args.providers)
    cached_s = time.perf_counter() - start
    print(f'  table: {len(table.data["specs"])} specs, '
          f'{table.data["graphs"]} graphs, built in '
          f'{table.data["build_s"]:.0f} s (this call {first_s:.0f} s, cached '
          f'call {cached_s:.1f} s); full model {table.full_ms:.2f} ms on '
          f'{table.provider}')
    extra = [LatencyTable.build(model, INPUT, threads=args.threads,
                                providers=args.providers, cache_dir=False)
             for _ in range(args.builds - 1)]
    comb = comb_model(model, input_shape=INPUT)
    models = {'unpruned': model}
    cost = CostModel(model, comb, table)
    for label, kept in plans(comb, args.random_plans, cost=cost).items():
        models[label] = prune_model(copy.deepcopy(model), comb, kept).eval()
    rows, paths = {}, []
    for label, m in models.items():
        path = osp.join(tmp, f'{name}_{label}.onnx')
        export_onnx(m, path, INPUT[2:], force=True)
        paths.append(path)
        widths = table.widths_of_model(m)
        rows[label] = dict(
            predicted_ms=table.predict(widths),
            methods={k: table.predict(widths, k) for k in METHODS},
            # fraction of the unpruned model predicted by each table
            builds=[t.predict(widths) / t.full_ms for t in [table] + extra],
            **model_complexity(m, INPUT))
    sessions = [create_session(p, [table.provider], args.threads)
                for p in paths]
    x = np.random.default_rng(0).standard_normal(INPUT).astype(np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, feed in zip(sessions, feeds):
        for _ in range(args.warmup):
            s.run(None, feed)
    print(f'  timing {len(sessions)} models, {args.runs} runs each, '
          f'interleaved; load average {os.getloadavg()[0]:.1f}')
    timed = time_sessions(sessions, feeds, args.runs)
    clock = table.data['clock']
    base = {k: float(np.median(v)) for k, v in zip(('wall', 'cpu'),
                                                   timed[0])}
    for (label, row), (wall, cpu) in zip(rows.items(), timed):
        main = cpu if clock == 'cpu' else wall
        row.update(
            measured_ms=float(np.median(main)),
            measured_iqr_ms=float(np.subtract(*np.percentile(main,
                                                             [75, 25]))),
            wall_ms=float(np.median(wall)), cpu_ms=float(np.median(cpu)),
            wall_iqr_ms=float(np.subtract(*np.percentile(wall, [75, 25]))),
            busy=float(np.median(cpu / wall)))
        row['error'] = row['predicted_ms'] / row['measured_ms'] - 1
        # the prediction as a fraction of the unpruned model, applied to the
        # unpruned model measured now (removes a load change since the build)
        frac = row['predicted_ms'] / table.full_ms
        row['error_rescaled'] = frac * base[clock] / row['measured_ms'] - 1
        row['error_wall'] = frac * base['wall'] / row['wall_ms'] - 1
        row['method_errors'] = {
            k: v / table.full_ms * base[clock] / row['measured_ms'] - 1
            for k, v in row['methods'].items()}
        row['build_errors'] = [f * base[clock] / row['measured_ms'] - 1
                               for f in row['builds']]
        row['flops_ratio'] = rows['unpruned']['flops'] / row['flops']
        row['speedup'] = base[clock] / row['measured_ms']
    load = os.getloadavg()[0]
    busy = rows['unpruned']['busy']
    disturbed = busy < 0.9
    print(f'  load average {load:.1f}; the timing thread ran {100 * busy:.0f}'
          f'% of the wall time' + (' (DISTURBED: wall times include other '
                                   'processes)' if disturbed else ''))
    return dict(model=MODELS[name], input_shape=list(INPUT),
                threads=args.threads, provider=table.provider,
                table=dict(key=table.data['key'], full_ms=table.full_ms,
                           full=table.data['full'], specs=len(
                               table.data['specs']),
                           graphs=table.data['graphs'],
                           build_s=table.data['build_s'],
                           cached_build_s=cached_s,
                           extra_build_s=[t.data['build_s'] for t in extra]),
                clock=clock, load_average=load, busy=busy,
                disturbed=disturbed,
                unpruned_drift=base[clock] / table.full_ms - 1, plans=rows)


def _scheduler():
    """'SCHED_FIFO' under ``chrt -f``, 'SCHED_OTHER' normally."""
    policy = os.sched_getscheduler(0)
    return next((n for n in ('SCHED_OTHER', 'SCHED_FIFO', 'SCHED_RR',
                             'SCHED_BATCH', 'SCHED_IDLE')
                 if getattr(os, n, None) == policy), str(policy))


def main(argv=None):
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = run_model(name, args, tmp)
    table_rows = []
    for name, r in results.items():
        for label, row in r['plans'].items():
            table_rows.append((
                name, label, f'{row["flops_ratio"]:.2f}x',
                f'{row["speedup"]:.2f}x',
                f'{row["measured_ms"]:.1f} ({row["measured_iqr_ms"]:.1f})',
                f'{row["predicted_ms"]:.1f}', f'{100 * row["error"]:+.1f}%',
                f'{100 * row["error_rescaled"]:+.1f}%',
                f'{row["wall_ms"]:.1f}', f'{100 * row["error_wall"]:+.1f}%'))
    print('\npredicted vs measured (medians, ms; (IQR); clock: '
          + ', '.join(f'{n} {r["clock"]}' for n, r in results.items()) + ')')
    print(format_table(('model', 'plan', 'FLOPs ratio', 'speed-up',
                        'measured (IQR)', 'predicted', 'error',
                        'error rescaled', 'wall', 'error wall'),
                       table_rows))
    if args.builds > 1:
        print(f'\nerror (rescaled) of each of {args.builds} tables')
        print(format_table(('model', 'plan', 'errors', 'median'), [
            (name, label, ' '.join(f'{100 * e:+.1f}%'
                                   for e in row['build_errors']),
             f'{100 * np.median(row["build_errors"]):+.1f}%')
            for name, r in results.items()
            for label, row in r['plans'].items()]))
    print('\nerror (rescaled) by prediction method')
    print(format_table(('model', 'plan') + METHODS, [
        (name, label) + tuple(f'{100 * row["method_errors"][k]:+.1f}%'
                              for k in METHODS)
        for name, r in results.items() for label, row in r['plans'].items()]))
    for name, r in results.items():
        print(f'{name}: unpruned measured now vs table.full_ms: '
              f'{100 * r["unpruned_drift"]:+.1f}%; table built in '
              f'{r["table"]["build_s"]:.0f} s, cached in '
              f'{r["table"]["cached_build_s"]:.1f} s')
    if args.json:
        write_json(dict(command=' '.join(sys.argv), scheduler=_scheduler(),
                        runs=args.runs, warmup=args.warmup,
                        threads=args.threads, results=results), args.json,
                   force=True)
        print(f'results written to {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
