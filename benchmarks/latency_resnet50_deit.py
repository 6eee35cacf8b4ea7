#!/usr/bin/env python
"""Does removing FLOPs with cpd_mm buy onnxruntime latency? ResNet-50, DeiT-S.

For each model (MMPretrain, batch 1, 224x224):

1. build it with random weights (latency does not depend on weight values,
   and nothing is downloaded);
2. comb it, score channels (L1 magnitude by default: no data needed), and
   select channels with the project's greedy schedule until the deployed
   model keeps ``--keep-flops`` of its FLOPs; surgery makes it physically
   smaller;
3. export original and pruned to ONNX, verify both against PyTorch, and time
   them with onnxruntime, interleaved so machine load hits both alike;
4. report parameters, FLOPs (mmengine.analysis) and the latency speed-up next
   to the FLOPs ratio.

Example::

    OMP_NUM_THREADS=1 python benchmarks/latency_resnet50_deit.py \\
        --runs 200 --threads 1 [--json benchmarks/latency_resnet50_deit.json]

On a busy machine use more runs and compare medians; the interleaving keeps
the *ratio* fair even when absolute numbers drift.
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
from cpd_mm.deploy import (benchmark_sessions, comparison, comparison_table,
                           create_session, export_onnx, model_complexity,
                           select_providers, verify_onnx, write_json)
from cpd_mm.deploy.report import format_table
from cpd_mm.prune import CostModel, prune_model, select_channels
from cpd_mm.prune.importance import ImportanceAccumulator

#: Short name -> MMPretrain model name (configs ship with mmpretrain).
MODELS = {
    'resnet50': 'resnet50_8xb32_in1k',
    'deit-s': 'deit-small_4xb256_in1k',
}
INPUT = (1, 3, 224, 224)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=list(MODELS),
                   choices=list(MODELS))
    p.add_argument('--keep-flops', type=float, default=0.5,
                   help='fraction of FLOPs the pruned model keeps')
    p.add_argument('--importance', choices=('l1', 'random'), default='l1',
                   help='channel score (data-free ones only)')
    p.add_argument('--runs', type=int, default=200, help='timed runs each')
    p.add_argument('--warmup', type=int, default=20)
    p.add_argument('--threads', type=int, default=0,
                   help='onnxruntime intra-op threads (0: its default)')
    p.add_argument('--providers', nargs='+', help='onnxruntime providers '
                   '(default: CUDA if available, else CPU)')
    p.add_argument('--out-dir', help='keep the ONNX files here (default: a '
                   'temporary directory)')
    p.add_argument('--round-to', type=int, default=1,
                   help='keep channel counts multiples of this (default 1)')
    p.add_argument('--json', default='benchmarks/latency_resnet50_deit.json',
                   help='write all results to this file (replaced)')
    p.add_argument('--force', action='store_true',
                   help='overwrite existing ONNX files in --out-dir')
    args = p.parse_args(argv)
    if not 0 < args.keep_flops <= 1:
        p.error(f'--keep-flops must be in (0, 1], got {args.keep_flops}')
    if args.runs < 1 or args.warmup < 0 or args.threads < 0:
        p.error('need --runs >= 1, --warmup >= 0 and --threads >= 0')
    return args


def build(name):
    from mmpretrain import get_model
    torch.manual_seed(0)
    return get_model(MODELS[name], pretrained=False, device='cpu').eval()


def prune_copy(model, keep_flops, importance, round_to=1):
    """A physically pruned deep copy keeping ``keep_flops`` of the FLOPs."""
    comb = comb_model(model, input_shape=INPUT)
    cost = CostModel(model, comb)
    scores = ImportanceAccumulator(model, comb, importance).current()
    kept = select_channels(scores, np.ones(comb.num_channels, dtype=bool),
                           comb, cost, keep_flops * cost.total_flops,
                           metric='flops', round_to=round_to)
    pruned = copy.deepcopy(model)
    prune_model(pruned, comb, kept)
    removed = int((~kept).sum())
    print(f'  comb: {comb.num_channels} channels in {len(comb.groups)} groups;'
          f' removed {removed} channels')
    return pruned


def run_model(name, args, out_dir, providers):
    print(f'== {name} ({MODELS[name]}), input {list(INPUT)}')
    start = time.time()
    original = build(name)
    pruned = prune_copy(original, args.keep_flops, args.importance,
                        args.round_to)
    entries = {}
    paths = []
    for label, model in (('original', original), ('pruned', pruned)):
        path = osp.join(out_dir, f'{name}_{label}.onnx')
        check = {}
        export_onnx(model, path, INPUT[2:], force=args.force,
                    before_publish=lambda tmp, m=model, c=check: c.update(
                        verify_onnx(m, tmp, INPUT[1:], providers=providers)))
        entries[label] = dict(**model_complexity(model, INPUT),
                              verify=check, onnx=path)
        print(f'  {label}: exported {path}, max |ort - torch| = '
              f'{check["max_abs_diff"]:.2g}')
        paths.append(path)
    sessions = [create_session(p, providers, args.threads) for p in paths]
    print(f'  timing with {sessions[0].get_providers()[0]}: {args.warmup} '
          f'warm-up + {args.runs} runs each, interleaved')
    x = np.random.default_rng(0).standard_normal(INPUT).astype(np.float32)
    stats = benchmark_sessions(sessions, x, args.runs, args.warmup)
    for label, s in zip(('original', 'pruned'), stats):
        entries[label]['benchmark'] = s
    print(comparison_table(entries['original'], entries['pruned']))
    print(f'  ({time.time() - start:.0f} s)')
    return dict(model=MODELS[name], input_shape=list(INPUT),
                keep_flops=args.keep_flops, importance=args.importance,
                round_to=args.round_to,
                **entries, **comparison(entries['original'],
                                        entries['pruned']))


def main(argv=None):
    args = parse_args(argv)
    providers = select_providers(args.providers)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        for name in args.models:
            results[name] = run_model(name, args, out_dir, providers)
    rows = [(name, f'{r["flops_ratio"]:.2f}x', f'{r["params_ratio"]:.2f}x',
             f'{r["speedup_median"]:.2f}x', f'{r["speedup_mean"]:.2f}x')
            for name, r in results.items()]
    print('\nsummary (original / pruned; speed-up = latency ratio)')
    print(format_table(('model', 'FLOPs ratio', 'params ratio',
                        'speed-up median', 'speed-up mean'), rows))
    if args.json:
        write_json(dict(threads=args.threads, runs=args.runs,
                        warmup=args.warmup, results=results), args.json,
                   force=True)
        print(f'results written to {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
