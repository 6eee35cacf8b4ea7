"""Structural latency at 2x fewer FLOPs: cpd_mm's cost-aware selection next
to Torch-Pruning (TP) at the same FLOPs, on MMPretrain ResNet-50 and DeiT-S.

    pip install -e .[benchmark]          # torch-pruning
    OMP_NUM_THREADS=1 python benchmarks/latency_vs_torch_pruning.py \\
        [--models resnet50 deit-s] [--keep-flops 0.5] [--round-to 8] \\
        [--runs 150] [--json F]

Weights (nothing is downloaded): the model's own initialisation
(``init_weights()``, seed 0), then every norm weight (BatchNorm, LayerNorm)
drawn from U(0.5, 1.5). With the plain initialisation every BatchNorm weight
is 1 (and 0 for the last norm of a ResNet block), so every channel of a
BatchNorm-followed conv has the same magnitude score: ties, which a
selection may break by emptying whole stages. The script counts distinct
scores per group for both tools and reports groups with ties.

* cpd_mm: L1-magnitude scores (``ImportanceAccumulator(..., 'l1')``) and
  ``select_channels`` with its defaults (cost-aware ranking, ``max_removal``
  0.8) with ``metric='flops'``, until the deployed model keeps
  ``--keep-flops`` of its FLOPs, channel counts in multiples of
  ``--round-to``;
* TP 1.6: ``MetaPruner``, global pruning, ``GroupMagnitudeImportance``
  (its defaults: p=2, mean over the group, mean-normalised), ``round_to``,
  the classifier ignored, ``pruning_ratio`` found by bisection so that the
  FLOPs (mmengine's count of the exported graph) match cpd_mm's.

The three models are exported to ONNX, checked against PyTorch and timed by
onnxruntime (CPU, ``--threads``, interleaved). The kept width of every
channel group is printed for both tools (TP's pruning is mapped to cpd_mm's
groups, see ``tp_bridge.py``), with the smallest kept share; a group at one
channel or below 10% of its width is flagged as degenerate.
"""
import argparse
import copy
import os.path as osp
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

from cpd_mm.comb import comb_model
from cpd_mm.deploy import (benchmark_sessions, count_flops, create_session,
                           export_onnx, inference_params, select_providers,
                           verify_onnx, write_json)
from cpd_mm.deploy.report import format_table
from cpd_mm.prune import CostModel, make_plan, prune_model, select_channels
from cpd_mm.prune.importance import ImportanceAccumulator

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from tp_bridge import (check_plan, degenerate, group_widths,  # noqa: E402
                       plan_from_history, tp_prune)

MODELS = {'resnet50': 'resnet50_8xb32_in1k',
          'deit-s': 'deit-small_4xb256_in1k'}
INPUT = (1, 3, 224, 224)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def build(name):
    return build_config(MODELS[name])


def build_config(config):
    """MMPretrain model ``config`` with its own initialisation and norm
    weights ~ U(0.5, 1.5) (seed 0: L1 scores without ties), in eval mode."""
    from mmpretrain import get_model
    torch.manual_seed(0)
    model = get_model(config, pretrained=False, device='cpu')
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS) and getattr(m, 'weight', None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return model.eval()


def cpd_select(model, comb, keep, round_to):
    cost = CostModel(model, comb)
    scores = ImportanceAccumulator(model, comb, 'l1').current()
    kept = select_channels(scores, np.ones(comb.num_channels, dtype=bool),
                           comb, cost, keep * cost.total_flops,
                           metric='flops', round_to=round_to)
    ties = [(g.name, g.size, len(np.unique(scores[g.channels])))
            for g in comb.prunable_groups]
    pruned = prune_model(copy.deepcopy(model), comb, kept)
    return pruned, make_plan(comb, kept, model), ties


def tp_to_flops(model, target, round_to, tol=0.005):
    """TP's pruned model whose FLOPs are closest to ``target``."""
    x = torch.randn(*INPUT)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (lo + hi) / 2
        m, history, _ = tp_prune(model, x, 'magnitude', ratio,
                                 round_to=round_to)
        f = count_flops(m, INPUT)
        if best is None or abs(f - target) < abs(best[2] - target):
            best = (ratio, m, f, history)
        if abs(f - target) / target < tol:
            break
        lo, hi = (ratio, hi) if f > target else (lo, ratio)
    ratio, m, _, history = best
    _, _, ties = tp_prune(model, x, 'magnitude', ratio, round_to=round_to,
                          check_ties=True)
    return ratio, m, history, ties


def describe(label, widths, ties):
    short = [(n.replace('backbone.', ''), k, s) for n, k, s in widths]
    tied = [t for t in ties if t[2] < t[1]]
    bad = degenerate(widths)
    print(f'  {label}: kept/size per group: ' + ', '.join(
        f'{n} {k}/{s}' for n, k, s in short))
    share = min(k / s for _, k, s in widths)
    print(f'  {label}: smallest kept share {share:.3f}; groups with tied '
          f'scores: {len(tied)} of {len(ties)}'
          + (f' {tied[:3]}' if tied else ''))
    if bad:
        print(f'  {label}: DEGENERATE structure (a group at one channel or '
              f'below 10%): {bad}')
    return dict(widths=widths, min_share=share, degenerate=bad,
                tied_groups=tied, groups_scored=len(ties))


def run_model(name, args, tmp, providers):
    print(f'== {name} ({MODELS[name]}), input {list(INPUT)}', flush=True)
    start = time.time()
    model = build(name)
    comb = comb_model(model, input_shape=INPUT)
    cpd, cpd_plan, cpd_ties = cpd_select(model, comb, args.keep_flops,
                                         args.round_to)
    cpd_flops = count_flops(cpd, INPUT)
    ratio, tpm, history, tp_ties = tp_to_flops(model, cpd_flops,
                                               args.round_to)
    tp_plan = plan_from_history(comb, history, model)
    diff = check_plan(build(name), tp_plan, tpm, torch.randn(*INPUT))
    print(f'  TP pruning_ratio {ratio:.4f}; its plan rebuilds TP\'s model '
          f'(max |diff| {diff:.1e})', flush=True)
    entries = {'original': dict(model=model),
               'cpd_mm': dict(model=cpd, **describe(
                   'cpd_mm', group_widths(comb, cpd_plan), cpd_ties)),
               'torch_pruning': dict(model=tpm, tp_ratio=ratio,
                                     rebuild_max_abs_diff=diff, **describe(
                                         'TP', group_widths(comb, tp_plan),
                                         tp_ties))}
    sessions = []
    for label, e in entries.items():
        path = osp.join(tmp, f'{name}_{label}.onnx')
        check = {}
        export_onnx(e['model'], path, INPUT[2:], force=True,
                    before_publish=lambda p, m=e['model'], c=check: c.update(
                        verify_onnx(m, p, INPUT[1:], providers=providers)))
        e.update(flops=count_flops(e['model'], INPUT),
                 params=inference_params(e['model']),
                 max_abs_diff_onnx=check['max_abs_diff'])
        sessions.append(create_session(path, providers, args.threads))
    x = np.random.default_rng(0).standard_normal(INPUT).astype(np.float32)
    stats = benchmark_sessions(sessions, x, args.runs, args.warmup)
    base = entries['original']
    for e, s in zip(entries.values(), stats):
        e.pop('model')
        e.update(median_ms=s['median_ms'], mean_ms=s['mean_ms'],
                 speedup=stats[0]['median_ms'] / s['median_ms'],
                 flops_ratio=base['flops'] / e['flops'])
        e['speedup_per_flops_ratio'] = e['speedup'] / e['flops_ratio']
    print(f'  ({time.time() - start:.0f} s)', flush=True)
    return entries


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', default=list(MODELS),
                   choices=list(MODELS))
    p.add_argument('--keep-flops', type=float, default=0.5)
    p.add_argument('--round-to', type=int, default=8)
    p.add_argument('--runs', type=int, default=150)
    p.add_argument('--warmup', type=int, default=10)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', default='benchmarks/latency_vs_torch_pruning.json')
    args = p.parse_args(argv)
    if not 0 < args.keep_flops < 1:
        p.error(f'--keep-flops must be in (0, 1), got {args.keep_flops}')
    providers = select_providers(['CPUExecutionProvider'])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = run_model(name, args, tmp, providers)
    rows = []
    for name, entries in results.items():
        for label, e in entries.items():
            rows.append((name, label, f'{e["flops"] / 1e9:.3f}',
                         f'{e["params"] / 1e6:.3f}', f'{e["median_ms"]:.2f}',
                         f'{e["speedup"]:.2f}x',
                         f'{e["speedup_per_flops_ratio"]:.2f}',
                         f'{e.get("min_share", 1.0):.3f}',
                         'yes' if e.get('degenerate') else 'no'))
    header = ('model', 'tool', 'GFLOPs', 'params M', 'median ms', 'speed-up',
              'speed-up / FLOPs ratio', 'smallest kept share', 'degenerate')
    print(f'\nonnxruntime {providers[0]}, {args.threads} thread(s), '
          f'{args.runs} interleaved runs, batch 1, 224x224')
    print(format_table(header, rows))
    print('\n| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')
    write_json(dict(keep_flops=args.keep_flops, round_to=args.round_to,
                    threads=args.threads, runs=args.runs,
                    weights='init_weights(), norm weights ~ U(0.5, 1.5), '
                    'seed 0', results=results), args.json, force=True)
    print(f'results written to {args.json}')


if __name__ == '__main__':
    main()
