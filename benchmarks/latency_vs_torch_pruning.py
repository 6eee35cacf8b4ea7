"""ResNet-50 pruned by cpd_mm and by Torch-Pruning to the same FLOPs:
onnxruntime CPU latency of the original and both pruned models.

    pip install -e .[benchmark]
    OMP_NUM_THREADS=1 python benchmarks/latency_vs_torch_pruning.py \\
        [--keep-flops 0.5] [--runs 200] [--threads 1] [--json F]

Both use L1-magnitude channel scores (data-free, random weights: latency
does not depend on weight values). cpd_mm selects channels greedily across
all groups until the deployed model keeps ``--keep-flops`` of its FLOPs;
Torch-Pruning's MetaPruner (global pruning, MagnitudeImportance p=1, the
classifier ignored) gets the pruning ratio found by bisection that lands on
the same FLOPs. The three ONNX models are timed interleaved.
"""
import argparse
import copy
import json
import os.path as osp
import tempfile

import numpy as np
import torch
import torchvision

from cpd_mm.comb import comb_model
from cpd_mm.deploy import benchmark_sessions, create_session, select_providers
from cpd_mm.prune import CostModel, prune_model, select_channels
from cpd_mm.prune.importance import ImportanceAccumulator

INPUT = (1, 3, 224, 224)


def flops_params(model):
    import torch_pruning as tp
    return tp.utils.count_ops_and_params(model, torch.randn(*INPUT))


def cpd_prune(model, keep):
    comb = comb_model(model, input_shape=INPUT)
    cost = CostModel(model, comb)
    scores = ImportanceAccumulator(model, comb, 'l1').current()
    kept = select_channels(scores, np.ones(comb.num_channels, bool), comb,
                           cost, keep * cost.total_flops, metric='flops')
    return prune_model(copy.deepcopy(model), comb, kept)


def tp_prune(model, ratio):
    import torch_pruning as tp
    m = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        m, torch.randn(*INPUT), importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, global_pruning=True, ignored_layers=[m.fc])
    pruner.step()
    return m


def tp_to_flops(model, target):
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = tp_prune(model, mid)
        f, _ = flops_params(m)
        best = (mid, m, f)
        if abs(f - target) / target < 0.005:
            break
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--keep-flops', type=float, default=0.5)
    ap.add_argument('--runs', type=int, default=200)
    ap.add_argument('--warmup', type=int, default=20)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--json', default='benchmarks/latency_vs_torch_pruning.json')
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    f0, p0 = flops_params(model)
    cpd = cpd_prune(model, args.keep_flops).eval()
    f1, p1 = flops_params(cpd)
    ratio, tpm, _ = tp_to_flops(model, f1)
    tpm.eval()
    f2, p2 = flops_params(tpm)
    models = dict(original=model, cpd_mm=cpd, torch_pruning=tpm)
    x = torch.randn(*INPUT)
    providers = select_providers(None)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for name, m in models.items():
            path = osp.join(tmp, name + '.onnx')
            torch.onnx.export(m, (x, ), path, opset_version=17,
                              input_names=['input'], dynamo=False)
            sessions.append(create_session(path, providers, args.threads))
        stats = benchmark_sessions(sessions, x.numpy(), args.runs,
                                   args.warmup)
    rows = []
    for (name, m), f, p, st in zip(models.items(), (f0, f1, f2),
                                   (p0, p1, p2), stats):
        rows.append(dict(model=name, flops=int(f), params=int(p),
                         median_ms=st['median_ms'], mean_ms=st['mean_ms'],
                         speedup=stats[0]['median_ms'] / st['median_ms']))
    print(f'\nTorch-Pruning ratio {ratio:.3f}; provider {providers[0]}, '
          f'{args.threads} thread(s), {args.runs} runs')
    print(f'{"model":14s} {"GFLOPs":>8s} {"params M":>9s} {"median ms":>10s}'
          f' {"speed-up":>9s}')
    for r in rows:
        print(f'{r["model"]:14s} {r["flops"] / 1e9:8.3f} '
              f'{r["params"] / 1e6:9.3f} {r["median_ms"]:10.2f} '
              f'{r["speedup"]:8.2f}x')
    with open(args.json, 'w') as fh:
        json.dump(dict(keep_flops=args.keep_flops, tp_ratio=ratio,
                       threads=args.threads, runs=args.runs, rows=rows),
                  fh, indent=1)


if __name__ == '__main__':
    main()
