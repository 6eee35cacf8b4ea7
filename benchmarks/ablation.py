"""Ablations on the demo models: importance criteria and distillation.

    python benchmarks/ablation.py cls [--importance hessian taylor l1 random]
        [--distill kl none] [--sparsity 0.3 0.5 0.7] [--seeds 0 1]
        [--reference] [--round-to N] [--teacher CKPT] [--jobs 2]
        [--json F] [--plot F.png]
    python benchmarks/ablation.py seg [--distill cwd cirkd none] ...
    python benchmarks/ablation.py det [--distill kl cwd none] ...

Every variant starts from the same trained baseline (train it first with
``python tools/train.py configs/demo/<base config>``), runs the demo prune
config with the same fine-tuning budget, and is evaluated through
``tools/test.py`` with the *original* config on its ``pruned_final.pth``.
Prints a table of every run, a table of means over seeds, and writes JSON.

``--reference`` adds the unpruned baseline fine-tuned with the same schedule
(no hook, no teacher), which separates what pruning costs from what the extra
fine-tuning gains.

``--teacher CKPT`` distils from that checkpoint (built with the base config)
instead of the unpruned starting model; ``--round-to N`` sets the hook's
``round_to``.

Each finished run stores ``result.json`` in its work dir and is reused on the
next invocation (``--rerun`` ignores them), so an interrupted grid resumes.
``--jobs N`` runs N variants at once, each with ``OMP_NUM_THREADS=1`` unless
the variable is already set; more jobs than cores only slows every run down.
"""
import argparse
import itertools
import json
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SETUPS = {
    'cls': dict(base='configs/demo/resnet18_demo-cls.py',
                prune='configs/demo/resnet18_demo-cls_prune.py',
                ckpt='work_dirs/resnet18_demo-cls/epoch_30.pth',
                metric=r'accuracy/top1: ([0-9.]+)', distill=['kl', 'none']),
    'seg': dict(base='configs/demo/pspnet_r18_demo-seg.py',
                prune='configs/demo/pspnet_r18_demo-seg_prune.py',
                ckpt='work_dirs/pspnet_r18_demo-seg/epoch_20.pth',
                metric=r'mIoU: ([0-9.]+)', distill=['cwd', 'cirkd', 'none']),
    # COCO bbox mAP, printed by mmdet as a fraction: reported in %
    'det': dict(base='configs/demo/rtmdet_demo-det.py',
                prune='configs/demo/rtmdet_demo-det_prune.py',
                ckpt='work_dirs/rtmdet_demo-det/epoch_12.pth',
                metric=r'coco/bbox_mAP: ([0-9.]+)', scale=100,
                distill=['kl', 'cwd', 'none']),
}
METRIC_NAMES = {'cls': 'top-1', 'seg': 'mIoU', 'det': 'mAP'}


def sh(cmd, log):
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', '1')
    with open(log, 'a') as f:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env)
        f.write(p.stdout)
    if p.returncode:
        print(p.stdout[-3000:])
        raise RuntimeError(f'failed (log: {log}): {" ".join(cmd)}')
    return p.stdout


def last_float(pattern, text):
    found = re.findall(pattern, text)
    if not found:
        raise RuntimeError(f'no match for {pattern!r} in the output')
    return float(found[-1])


def run(args, s, ckpt, name, options, weights, config_extra=''):
    """Train the prune config (plus ``config_extra`` lines) with
    ``options``, test ``weights`` of its work dir with the base config; reuse
    ``result.json`` of a finished run."""
    wd = osp.join(ROOT, args.work_dir, name)
    result = osp.join(wd, 'result.json')
    if osp.exists(result) and not args.rerun:
        with open(result) as f:
            row = json.load(f)
        if row.get('baseline') == ckpt:
            print(f'reusing {result}', flush=True)
            return row
    os.makedirs(wd, exist_ok=True)
    log = osp.join(wd, 'ablation.log')
    open(log, 'w').close()
    config = s['prune']
    if config_extra:
        config = osp.join(wd, 'ablation_config.py')
        with open(config, 'w') as f:
            f.write(f"_base_ = ['{osp.join(ROOT, s['prune'])}']\n"
                    + config_extra)
    t = time.time()
    train = sh([sys.executable, 'tools/train.py', config, '--work-dir', wd,
                '--cfg-options', f'load_from={ckpt}', *options], log)
    if weights == 'last_checkpoint':  # a text file naming the checkpoint
        with open(osp.join(wd, weights)) as f:
            weights = f.read().strip()
    test = sh([sys.executable, 'tools/test.py', s['base'],
               osp.join(wd, weights), '--work-dir', osp.join(wd, 'test')], log)
    row = dict(task=args.task,
               score=round(last_float(s['metric'], test) * s.get('scale', 1),
                           4),
               seconds=round(time.time() - t, 1), baseline=ckpt, log=train)
    return row, result


def run_variant(args, s, ckpt, imp, dist, sp, seed):
    name = f'{args.task}_{imp}_{dist}_s{int(round(sp * 100))}_seed{seed}'
    extra = ''
    if args.round_to > 1:
        name += f'_round{args.round_to}'
    if args.teacher:  # a config for it: model.teacher is a string in base
        name += f'_teacher-{osp.basename(osp.dirname(args.teacher))}'
        extra = (f"model = dict(teacher=dict(_delete_=True, config="
                 f"'{s['base']}', checkpoint='{args.teacher}'))\n")
    out = run(args, s, ckpt, name,
              [f'model.distill={dist}', f'custom_hooks.0.importance={imp}',
               f'custom_hooks.0.target_sparsity={sp}',
               f'custom_hooks.0.round_to={args.round_to}',
               'custom_hooks.0.save_at=[]', f'custom_hooks.0.seed={seed}',
               f'randomness.seed={seed}'], 'pruned_final.pth', extra)
    if isinstance(out, dict):
        return out
    row, result = out
    train = row.pop('log')
    row.update(importance=imp, sparsity=sp, seed=seed,
               distill=dist + ('+teacher' if args.teacher else ''),
               round_to=args.round_to, teacher=args.teacher or 'self',
               params_M=last_float(r'cpd_params_M: ([0-9.]+)', train),
               flops_ratio=last_float(r'cpd_flops_ratio: ([0-9.]+)', train))
    with open(result, 'w') as f:
        json.dump(row, f, indent=1)
    print(row, flush=True)
    return row


def run_reference(args, s, ckpt, seed, params_M):
    """The unpruned baseline fine-tuned with the same schedule and no
    hook: what the fine-tuning budget alone gives."""
    out = run(args, s, ckpt, f'{args.task}_unpruned_seed{seed}',
              ['model.distill=none', 'custom_hooks=[]',
               f'randomness.seed={seed}'], 'last_checkpoint')
    if isinstance(out, dict):
        return out
    row, result = out
    row.pop('log')
    row.update(importance='unpruned', distill='none', sparsity=0.0,
               seed=seed, params_M=params_M, flops_ratio=1.0)
    with open(result, 'w') as f:
        json.dump(row, f, indent=1)
    print(row, flush=True)
    return row


def plot(summary, metric, baseline_score, path):
    """Mean score against sparsity, one line per (importance, distillation),
    seeds as the range bar; the unpruned references as horizontal lines."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r['importance'], r['distill']) for r in summary
                   if r['importance'] != 'unpruned'})
    colours = {imp: f'C{i}' for i, imp in enumerate(
        sorted({imp for imp, _ in keys}))}
    for imp, dist in keys:
        pts = sorted((r['sparsity'], r['scores']) for r in summary
                     if (r['importance'], r['distill']) == (imp, dist))
        xs = [100 * sp for sp, _ in pts]
        means = [statistics.mean(sc) for _, sc in pts]
        err = [[m - min(sc) for m, (_, sc) in zip(means, pts)],
               [max(sc) - m for m, (_, sc) in zip(means, pts)]]
        ax.errorbar(xs, means, yerr=err, marker='o', capsize=3,
                    linestyle='-' if dist != 'none' else '--',
                    color=colours[imp],
                    label=f'{imp}, {dist}')
    for r in summary:
        if r['importance'] == 'unpruned':
            ax.axhline(r['mean'], color='k', linewidth=1,
                       label='unpruned, same fine-tuning')
    if baseline_score is not None:
        ax.axhline(baseline_score, color='grey', linestyle=':',
                   label='baseline (start)')
    ax.set_xlabel('parameters removed (%)')
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'plot written to {path}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('task', choices=sorted(SETUPS))
    ap.add_argument('--importance', nargs='+', default=['hessian'])
    ap.add_argument('--distill', nargs='+', default=None)
    ap.add_argument('--sparsity', nargs='+', type=float, default=[0.5])
    ap.add_argument('--seeds', nargs='+', type=int, default=[0])
    ap.add_argument('--baseline', help='baseline checkpoint to start from')
    ap.add_argument('--work-dir', default='work_dirs/ablation')
    ap.add_argument('--jobs', type=int, default=1,
                    help='variants run at once (default 1)')
    ap.add_argument('--reference', action='store_true',
                    help='also fine-tune the unpruned baseline with the same '
                    'schedule (no pruning, no distillation), once per seed')
    ap.add_argument('--round-to', type=int, default=1,
                    help="the hook's round_to (default 1: no rounding)")
    ap.add_argument('--teacher',
                    help='teacher checkpoint (base config) instead of the '
                    'unpruned starting model')
    ap.add_argument('--rerun', action='store_true',
                    help='ignore result.json of finished runs')
    ap.add_argument('--json', default=None)
    ap.add_argument('--plot', help='write score against sparsity to this '
                    'image (matplotlib)')
    ap.add_argument('--baseline-score', type=float,
                    help="the baseline's own score, drawn in the plot")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f'--jobs must be at least 1, got {args.jobs}')
    s = SETUPS[args.task]
    ckpt = args.baseline or s['ckpt']
    if not osp.exists(osp.join(ROOT, ckpt)):
        raise SystemExit(f'baseline checkpoint {ckpt} not found: train '
                         f'{s["base"]} first or pass --baseline')
    grid = list(itertools.product(args.importance,
                                  args.distill or s['distill'],
                                  args.sparsity, args.seeds))
    jobs = [lambda v=v: run_variant(args, s, ckpt, *v) for v in grid]
    if args.reference:
        # built here, once: config loading is not thread-safe (pkg_resources)
        from cpd_mm.apis import init_model
        params_M = round(sum(p.numel() for p in init_model(
            s['base'], device='cpu').parameters()) / 1e6, 4)
        jobs = [lambda seed=seed: run_reference(args, s, ckpt, seed,
                                                params_M)
                for seed in args.seeds] + jobs
    print(f'{len(jobs)} runs, {args.jobs} at a time', flush=True)
    pool = ThreadPoolExecutor(args.jobs)
    try:
        rows = list(pool.map(lambda job: job(), jobs))
    finally:  # a failed variant stops the grid; finished ones are kept
        pool.shutdown(cancel_futures=True)

    metric = METRIC_NAMES[args.task]
    print(f'\n{"importance":10s} {"distill":8s} {"sparsity":>8s} '
          f'{"seed":>4s} {"params M":>8s} {"FLOPs":>6s} {metric:>7s}')
    for r in rows:
        print(f'{r["importance"]:10s} {r["distill"]:8s} {r["sparsity"]:8.2f}'
              f' {r["seed"]:4d} {r["params_M"]:8.3f} {r["flops_ratio"]:6.3f}'
              f' {r["score"]:7.2f}')
    summary = []
    for key, grp in itertools.groupby(
            sorted(rows, key=lambda r: (r['sparsity'], r['distill'],
                                        r['importance'])),
            key=lambda r: (r['sparsity'], r['distill'], r['importance'])):
        scores = [r['score'] for r in grp]
        summary.append(dict(
            sparsity=key[0], distill=key[1], importance=key[2],
            mean=round(statistics.mean(scores), 2), scores=scores))
    print(f'\nmean {metric} over seeds {args.seeds}')
    print(f'{"sparsity":>8s} {"distill":8s} {"importance":10s} '
          f'{"mean":>6s}  per seed')
    for r in summary:
        print(f'{r["sparsity"]:8.2f} {r["distill"]:8s} {r["importance"]:10s}'
              f' {r["mean"]:6.2f}  {r["scores"]}')
    # the same means as a markdown table: one row per (importance,
    # distillation), one column per sparsity, seeds in brackets
    spars = sorted({r['sparsity'] for r in summary} - {0.0})
    print('\n| importance | distillation | '
          + ' | '.join(f'{sp:.0%} of the target removed' for sp in spars)
          + ' |')
    print('|---|---|' + '---|' * len(spars))
    pairs = [(r['importance'], r['distill']) for r in rows
             if r['importance'] != 'unpruned']
    for imp, dist in dict.fromkeys(pairs):  # unique, in grid order
        cells = []
        for sp in spars:
            m = [r for r in summary if (r['importance'], r['distill'],
                                         r['sparsity']) == (imp, dist, sp)]
            cells.append(f'{m[0]["mean"]:.1f} ('
                         + ', '.join(f'{x:.1f}' for x in m[0]['scores'])
                         + ')' if m else '')
        print(f'| {imp} | {dist} | ' + ' | '.join(cells) + ' |')
    for r in summary:
        if r['importance'] == 'unpruned':
            print(f'\nunpruned, same fine-tuning: {r["mean"]:.1f} ('
                  + ', '.join(f'{x:.1f}' for x in r['scores']) + ')')
    if args.plot:
        plot(summary, metric, args.baseline_score, args.plot)
    out = args.json or osp.join(ROOT, 'benchmarks',
                                f'ablation_{args.task}.json')
    with open(out, 'w') as f:
        json.dump(dict(baseline=ckpt, rows=rows, summary=summary), f,
                  indent=1)


if __name__ == '__main__':
    main()
