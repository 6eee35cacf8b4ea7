#!/usr/bin/env python
"""Pruning times INT8: ResNet-50 and DeiT-S on onnxruntime, CPU, one thread.

For each model (MMPretrain, random weights, batch 1, ``--size`` square):

1. measure its latency table twice, in FP32 and in INT8
   (``LatencyTable.build(..., precision=...)``; cached per precision);
2. prune it to half its latency with cpd_mm's cost-aware selection
   (``select_channels`` with ``metric='latency'``, L1 scores, multiples of
   ``--round-to``), once against each table: ``pruned@fp32`` is the
   structure fastest in FP32, ``pruned@int8`` the one fastest in INT8;
3. export unpruned and pruned models to ONNX (checked against PyTorch) and
   quantize each (onnxruntime static QDQ, per-channel weights, uint8
   activations, minmax on ``--calib`` random images: random weights, so
   the values do not matter, the kernels do; every compute node must be
   quantized);
4. time all graphs in one process, interleaved run by run
   (``benchmark_sessions``), ``--repeats`` times; report per graph the
   median of the per-repeat medians and its speed-up over the unpruned
   FP32 graph.

Rows: fp32, int8, pruned@fp32 fp32, pruned@fp32 int8, pruned@int8 fp32,
pruned@int8 int8.

Example (the issue's measurement, about 25 min on an idle machine: the
four latency tables dominate; later runs load them from the cache)::

    OMP_NUM_THREADS=1 python benchmarks/int8_speed.py \\
        --runs 200 --repeats 3 --json benchmarks/int8_speed.json

Smoke test (a minute)::

    OMP_NUM_THREADS=1 python benchmarks/int8_speed.py --models resnet18 \\
        --size 64 --runs 5 --repeats 1 --samples 2 --calib 2 --json /tmp/s.json
"""
import argparse
import copy
import os.path as osp
import sys
import tempfile
import time

import numpy as np
import torch

from cpd_mm.comb import comb_model
from cpd_mm.deploy import (LatencyTable, benchmark_sessions, count_flops,
                           create_session, export_onnx, verify_onnx,
                           write_json)
from cpd_mm.deploy.quantize import quantize_onnx
from cpd_mm.deploy.report import format_table
from cpd_mm.prune import CostModel, prune_model, select_channels
from cpd_mm.prune.importance import ImportanceAccumulator

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from latency_vs_torch_pruning import build_config  # noqa: E402

MODELS = {'resnet50': 'resnet50_8xb32_in1k',
          'deit-s': 'deit-small_4xb256_in1k',
          'resnet18': 'resnet18_8xb32_in1k'}  # resnet18: smoke tests
PRECISIONS = ('fp32', 'int8')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=['resnet50', 'deit-s'],
                   choices=list(MODELS))
    p.add_argument('--size', type=int, default=224, help='input H = W')
    p.add_argument('--keep-latency', type=float, default=0.5,
                   help='pruned latency / unpruned latency (per table)')
    p.add_argument('--round-to', type=int, default=8)
    p.add_argument('--runs', type=int, default=200,
                   help='timed runs per graph and repeat (interleaved)')
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--samples', type=int, default=5,
                   help='widths per axis of the latency tables')
    p.add_argument('--calib', type=int, default=8,
                   help='random calibration images per graph')
    p.add_argument('--rebuild', action='store_true',
                   help='measure the latency tables even if cached')
    p.add_argument('--json', default='benchmarks/int8_speed.json')
    args = p.parse_args(argv)
    for name in ('size', 'runs', 'repeats', 'threads', 'calib', 'round_to'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be >= 1')
    if not 0 < args.keep_latency < 1:
        p.error('--keep-latency must be in (0, 1)')
    return args


def build(name):
    return build_config(MODELS[name])


def prune_to_latency(model, comb, table, keep, round_to):
    """The model pruned until ``table`` predicts ``keep`` of its latency."""
    cost = CostModel(model, comb, table)
    scores = ImportanceAccumulator(model, comb, 'l1').current()
    kept = select_channels(scores, np.ones(comb.num_channels, dtype=bool),
                           comb, cost, keep * cost.total_latency, 'latency',
                           round_to=round_to)
    predicted = cost.evaluate(kept, 'latency')
    return prune_model(copy.deepcopy(model), comb, kept), predicted


def graphs(label, model, shape, tmp, args):
    """FP32 (verified) and INT8 (every compute node quantized) graphs."""
    fp32 = osp.join(tmp, f'{label}.onnx')
    export_onnx(model, fp32, shape[2:], force=True,
                before_publish=lambda p: verify_onnx(model, p, shape[1:]))
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal(shape).astype(np.float32)
             for _ in range(args.calib)]
    int8 = osp.join(tmp, f'{label}_int8.onnx')
    q = quantize_onnx(fp32, int8, calib, force=True, logger='silent')
    if q['fp32_compute_nodes']:
        raise RuntimeError(f'{label}: nodes left in FP32: '
                           f'{q["fp32_compute_nodes"][:5]}')
    return {'fp32': fp32, 'int8': int8}


def run_model(name, args, tmp):
    shape = (1, 3, args.size, args.size)
    print(f'== {name} ({MODELS[name]}), input {list(shape)}', flush=True)
    start = time.time()
    model = build(name)
    comb = comb_model(model, input_shape=shape)
    variants = {'unpruned': (model, {})}
    for precision in PRECISIONS:
        table = LatencyTable.build(model, shape, threads=args.threads,
                                   samples=args.samples,
                                   rebuild=args.rebuild, precision=precision)
        pruned, predicted = prune_to_latency(model, comb, table,
                                             args.keep_latency, args.round_to)
        variants[f'pruned@{precision}'] = (pruned, dict(
            table_full_ms=table.full_ms, predicted_ms=predicted,
            table_build_s=table.data.get('build_s')))
        print(f'  pruned against the {precision} table: predicted '
              f'{predicted:.2f} of {table.full_ms:.2f} ms', flush=True)
    paths, rows = [], []
    for label, (m, info) in variants.items():
        for precision, path in graphs(label, m, shape, tmp, args).items():
            paths.append(path)
            rows.append(dict(model=label, precision=precision,
                             flops=count_flops(m, shape), **info))
    sessions = [create_session(p, ['CPUExecutionProvider'], args.threads)
                for p in paths]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    medians = []
    for r in range(args.repeats):
        stats = benchmark_sessions(sessions, x, args.runs, args.warmup,
                                   progress=False)
        medians.append([s['median_ms'] for s in stats])
        print(f'  repeat {r + 1}/{args.repeats}: ' + ', '.join(
            f'{m:.2f}' for m in medians[-1]) + ' ms', flush=True)
    medians = np.asarray(medians)
    median = np.median(medians, axis=0)
    for row, ms, per_repeat in zip(rows, median, medians.T):
        row.update(median_ms=float(ms), repeats_ms=per_repeat.tolist(),
                   speedup=float(median[0] / ms),
                   repeat_speedups=(medians[:, 0] / per_repeat).tolist())
    print(format_table(
        ('graph', 'precision', 'GFLOPs', 'median ms', 'speed-up'),
        [(r['model'], r['precision'], f'{r["flops"] / 1e9:.2f}',
          f'{r["median_ms"]:.2f}', f'{r["speedup"]:.2f}x') for r in rows]))
    print(f'  ({time.time() - start:.0f} s)', flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    report = dict(settings=vars(args), models={})
    with tempfile.TemporaryDirectory(prefix='cpd_mm_int8_speed_') as tmp:
        for name in args.models:
            report['models'][name] = run_model(name, args, tmp)
    write_json(report, args.json, force=True)
    print(f'results written to {args.json}')
    return report


if __name__ == '__main__':
    main()
