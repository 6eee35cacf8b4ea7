"""Accuracy at equal measured latency: cpd_mm against Torch-Pruning (TP).

    pip install -e .[benchmark]          # torch-pruning
    python benchmarks/compare_torch_pruning.py cls seg --seeds 0 1 --jobs 2 \\
        [--work-dir work_dirs/compare_tp] [--json F]

For the demo classifier and the demo segmenter, from the same trained
baseline, with the same fine-tuning budget (the demo prune config's schedule:
16 epochs for the classifier, 8 for the segmenter) and the same evaluation
(``tools/test.py`` with the original config), four arms per seed:

* ``cpd_mm``: the demo prune config (Hessian importance, distillation,
  latency target, cost-aware selection); the segmenter with
  ``target='latency'``, ``--seg-sparsity`` and ``round_to=8``;
* ``tp_taylor`` / ``tp_magnitude``: TP's MetaPruner, global pruning,
  ``round_to=8``, GroupTaylorImportance (gradients of the training loss on
  ``--taylor-batches`` batches) or GroupMagnitudeImportance, output layers
  ignored. TP's ``pruning_ratio`` is found by bisection so that the pruned
  model's onnxruntime latency (one thread, timed interleaved with the
  baseline and the cpd_mm model) is the cpd_mm model's within ``--tol``.
  The result becomes a cpd_mm plan (checked: the plan rebuilds TP's shapes
  on a fresh model, TP's state dict loads strictly, outputs agree), is saved
  as a pruned checkpoint and fine-tuned by ``tools/train.py`` with the
  reference arm's settings (the runner applies the plan);
* ``reference``: the unpruned baseline fine-tuned with the same budget
  (``custom_hooks=[] model.distill=none``, as ``ablation.py --reference``).

Latency is measured alone (no training next to it); trainings run
``--jobs`` at a time with ``OMP_NUM_THREADS=1``. Finished runs, TP
selections and measurements are stored in the work dir and reused
(``--rerun`` ignores them).
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault('OMP_NUM_THREADS', '1')
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import ablation  # noqa: E402  (train / test / reuse helpers)

ROOT = ablation.ROOT
SETUPS = {
    'cls': dict(ablation.SETUPS['cls'], ckpt='work_dirs/demo/baseline/'
                'epoch_30.pth', shape=(32, 32), runs=2000, cpd_options=[]),
    'seg': dict(ablation.SETUPS['seg'], ckpt='work_dirs/seg_baseline/'
                'epoch_20.pth', shape=(64, 64), runs=500,
                cpd_options=['custom_hooks.0.target=latency',
                             'custom_hooks.0.round_to=8']),
}
ARMS = ('cpd_mm', 'cpd_mm_nokd', 'tp_taylor', 'tp_magnitude', 'reference')
REF_OPTIONS = ['model.distill=none', 'custom_hooks=[]']


def load_json(path):
    with open(path) as f:
        return json.load(f)


def dump_json(obj, path):
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(path + '.tmp', path)


# ------------------------------------------------------------ models
def build(task, ckpt=None):
    """The base config's model (with the runner's data preprocessor, which
    the training loss needs), loaded from ``ckpt``, on the CPU."""
    from mmengine.config import Config
    from cpd_mm.apis import init_model
    cfg = Config.fromfile(osp.join(ROOT, SETUPS[task]['base']))
    if 'data_preprocessor' not in cfg.model and cfg.get('data_preprocessor'):
        cfg.model.data_preprocessor = cfg.data_preprocessor
    return init_model(cfg, ckpt and osp.join(ROOT, ckpt), 'cpu')


def example(task):
    import torch
    return torch.randn(1, 3, *SETUPS[task]['shape'],
                       generator=torch.Generator().manual_seed(0))


def comb_of(task, model):
    from cpd_mm.comb import comb_model
    return comb_model(model, input_shape=(1, 3, *SETUPS[task]['shape']))


class Timer:
    """onnxruntime sessions (CPU, one thread) of models, timed together,
    interleaved."""

    def __init__(self, task, tmp):
        self.task, self.tmp, self.n = task, tmp, 0

    def session(self, model):
        from cpd_mm.deploy import create_session, export_onnx
        self.n += 1
        path = osp.join(self.tmp, f'm{self.n}.onnx')
        export_onnx(model, path, SETUPS[self.task]['shape'], force=True)
        return create_session(path, ['CPUExecutionProvider'], threads=1)

    def time(self, sessions, runs, warmup=50):
        import numpy as np
        from cpd_mm.deploy import benchmark_sessions
        x = example(self.task).numpy().astype(np.float32)
        return [s['median_ms'] for s in benchmark_sessions(
            sessions, x, runs, warmup, progress=False)]


# ------------------------------------------------------------ arms
def arm_dir(args, task, arm, seed):
    return osp.join(ROOT, args.work_dir, f'{task}_{arm}_seed{seed}')


def run_arm(args, task, arm, seed, load_from):
    """Train (or reuse) one arm and test it with the base config."""
    s = SETUPS[task]
    ns = argparse.Namespace(work_dir=args.work_dir, rerun=args.rerun,
                            task=task)
    if arm.startswith('cpd_mm'):
        options = s['cpd_options'] + [
            f'custom_hooks.0.target_sparsity={args.sparsity[task]}',
            'custom_hooks.0.save_at=[]', f'custom_hooks.0.seed={seed}',
            f'randomness.seed={seed}']
        if arm == 'cpd_mm_nokd':  # the same selection, no distillation
            options.append('model.distill=none')
        weights = 'pruned_final.pth'
    else:
        options, weights = REF_OPTIONS + [f'randomness.seed={seed}'], \
            'last_checkpoint'
    out = ablation.run(ns, s, load_from, f'{task}_{arm}_seed{seed}', options,
                       weights)
    if isinstance(out, dict):
        return out
    row, result = out
    row.pop('log')
    row.update(arm=arm, seed=seed, load_from=load_from, options=options)
    if weights == 'last_checkpoint':
        with open(osp.join(arm_dir(args, task, arm, seed), weights)) as f:
            row['weights'] = f.read().strip()
    else:
        row['weights'] = osp.join(arm_dir(args, task, arm, seed), weights)
    dump_json(row, result)
    print(f'{task} {arm} seed {seed}: {row["score"]}', flush=True)
    return row


def pool_map(jobs, n):
    pool = ThreadPoolExecutor(n)
    try:
        return list(pool.map(lambda job: job(), jobs))
    finally:  # a failed run stops the rest; finished ones are kept
        pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------ TP
def tp_select(args, task, imp, seed, cpd_ckpt, timer, base_sess, grads):
    """Bisect TP's pruning ratio to the cpd_mm model's measured latency;
    save the result as a pruned checkpoint with its cpd_mm plan."""
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from cpd_mm.prune import PLAN_META_KEY
    from tp_bridge import check_plan, plan_from_history, tp_prune
    path = osp.join(ROOT, args.work_dir, 'tp_select',
                    f'{task}_{imp}_seed{seed}.pth')
    info_path = path[:-4] + '.json'
    if osp.exists(info_path) and not args.rerun:
        print(f'reusing {path}', flush=True)
        return path, load_json(info_path)
    os.makedirs(osp.dirname(path), exist_ok=True)
    base = build(task, SETUPS[task]['ckpt'])
    cpd_sess = timer.session(build(task, cpd_ckpt))
    x = example(task)
    lo, hi, trials, seen, best = 0.0, 0.95, [], {}, None
    tie_report = None
    for _ in range(args.max_bisect):
        ratio = round((lo + hi) / 2, 4)
        model, history, ties = tp_prune(base, x, imp, ratio, grads=grads,
                                        check_ties=tie_report is None)
        key = tuple(tuple(p.shape) for p in model.parameters())
        if key not in seen:
            ms = timer.time([base_sess, cpd_sess, timer.session(model)],
                            SETUPS[task]['runs'])
            seen[key] = ms[2] / ms[1]
        rel = seen[key]
        trials.append(dict(ratio=ratio, tp_vs_cpd=round(rel, 4)))
        print(f'  {task} {imp} seed {seed}: ratio {ratio:.4f}: TP / cpd_mm '
              f'latency {rel:.3f}', flush=True)
        if best is None or abs(rel - 1) < abs(best[1] - 1):
            best = (ratio, rel, model, history)
        tie_report = tie_report or ties
        if abs(rel - 1) <= args.tol:
            break
        lo, hi = (ratio, hi) if rel > 1 else (lo, ratio)
    ratio, rel, model, history = best
    # confirm with a longer measurement: this is the matched ratio we report
    ms = timer.time([base_sess, cpd_sess, timer.session(model)],
                    2 * SETUPS[task]['runs'])
    comb = comb_of(task, base)
    plan = plan_from_history(comb, history, base)
    diff = check_plan(build(task), plan, model, x)
    if diff > 1e-4:
        raise RuntimeError(f'the plan of TP\'s {task} {imp} model does not '
                           f'rebuild it: outputs differ by {diff:.2e}')
    info = dict(importance=imp, seed=seed, ratio=ratio, trials=trials,
                confirm_ms=dict(base=ms[0], cpd_mm=ms[1], tp=ms[2]),
                tp_vs_cpd=ms[2] / ms[1], matched=abs(ms[2] / ms[1] - 1)
                <= args.tol, rebuild_max_abs_diff=diff,
                ties=[t for t in tie_report if t[2] < t[1]],
                groups_scored=len(tie_report),
                taylor_batches=args.taylor_batches if imp == 'taylor'
                else None)
    model.zero_grad(set_to_none=True)
    save_checkpoint({'state_dict': weights_to_cpu(model.state_dict()),
                     'meta': {PLAN_META_KEY: plan, 'torch_pruning': info}},
                    path)
    dump_json(info, info_path)
    print(f'  {task} {imp} seed {seed}: ratio {ratio}, TP / cpd_mm latency '
          f'{info["tp_vs_cpd"]:.3f} (confirmed), plan rebuilds TP exactly '
          f'(max |diff| {diff:.1e})', flush=True)
    return path, info


def select_all(args, task, rows):
    """TP selections of every seed and importance, measured alone."""
    from tp_bridge import loss_gradients
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        timer = Timer(task, tmp)
        base_sess = timer.session(build(task, SETUPS[task]['ckpt']))
        for seed in args.seeds:
            cpd_ckpt = rows[('cpd_mm', seed)]['weights']
            grads = None
            for imp in args.tp:
                if imp == 'taylor' and grads is None and (
                        args.rerun or not osp.exists(osp.join(
                            ROOT, args.work_dir, 'tp_select',
                            f'{task}_taylor_seed{seed}.json'))):
                    from mmengine.config import Config
                    cfg = Config.fromfile(osp.join(ROOT, SETUPS[task]['base']))
                    model = build(task, SETUPS[task]['ckpt'])
                    grads = loss_gradients(model, cfg, seed,
                                           args.taylor_batches)
                out[(imp, seed)] = tp_select(args, task, imp, seed, cpd_ckpt,
                                             timer, base_sess, grads)
    return out


# ------------------------------------------------------------ report
def measure_final(args, task, rows):
    """Latency (interleaved, alone), FLOPs, params and widths of every arm's
    final checkpoint, per seed."""
    from cpd_mm.deploy import model_complexity
    from tp_bridge import degenerate, group_widths
    base = build(task, SETUPS[task]['ckpt'])
    comb = comb_of(task, base)
    shape = (1, 3, *SETUPS[task]['shape'])
    for seed in args.seeds:
        path = osp.join(ROOT, args.work_dir, f'{task}_final_seed{seed}.json')
        arms = [a for a in ARMS if (a, seed) in rows]
        if osp.exists(path) and not args.rerun and set(
                load_json(path)) >= set(arms):
            measured = load_json(path)
        else:
            models = {a: build(task, rows[(a, seed)]['weights'])
                      for a in arms}
            with tempfile.TemporaryDirectory() as tmp:
                timer = Timer(task, tmp)
                sessions = [timer.session(base)] + [
                    timer.session(models[a]) for a in arms]
                # repeats: the medians of each, then their median (a shared
                # machine's load changes between repeats)
                reps = [timer.time(sessions, SETUPS[task]['runs'])
                        for _ in range(args.repeats)]
            ms = [statistics.median(r[i] for r in reps)
                  for i in range(len(sessions))]
            speedups = [[r[0] / r[i] for r in reps]
                        for i in range(len(sessions))]
            measured = {}
            for i, a in enumerate(arms, 1):
                widths = group_widths(comb, models[a].cpd_plan)
                measured[a] = dict(
                    median_ms=ms[i], base_ms=ms[0],
                    speedup=statistics.median(speedups[i]),
                    speedup_repeats=speedups[i],
                    **model_complexity(models[a], shape), widths=widths,
                    min_share=min(k / s for _, k, s in widths),
                    degenerate=degenerate(widths),
                    one_channel=[n for n, k, _ in widths if k <= 1])
            dump_json(measured, path)
        for a in arms:
            rows[(a, seed)].update(measured[a])


def report(args, task, rows):
    metric = ablation.METRIC_NAMES[task]
    lines = [f'\n### {task}: {metric}, latency at batch 1, '
             f'{SETUPS[task]["shape"][0]}x{SETUPS[task]["shape"][1]}, '
             'onnxruntime CPU, one thread\n',
             f'| arm | seed | {metric} | latency ms (baseline) | speed-up '
             + (f'(range over {args.repeats} timings) | ' if all(
                 'speedup_repeats' in r for r in rows.values()) else '| ')
             + 'MFLOPs | params M | TP ratio | TP / cpd_mm latency at '
             'selection | narrowest group |', '|---|---|---|---|---|---|---|'
             '---|---|---|']
    for a in ARMS:
        for seed in args.seeds:
            r = rows.get((a, seed))
            if r is None:
                continue
            narrow = min(r['widths'], key=lambda w: w[1] / w[2])
            sel = r.get('tp', {})
            lines.append(
                f'| {a} | {seed} | {r["score"]:.2f} | {r["median_ms"]:.3f} '
                f'({r["base_ms"]:.3f}) | {r["speedup"]:.2f}x '
                + (f'({min(r["speedup_repeats"]):.2f}-'
                   f'{max(r["speedup_repeats"]):.2f}) | '
                   if 'speedup_repeats' in r else '(one timing) | ')
                + f'{r["flops"] / 1e6:.2f} | {r["params"] / 1e6:.3f} | '
                + (f'{sel["ratio"]:.3f} | {sel["tp_vs_cpd"]:.3f} | '
                   if sel else '- | - | ')
                + f'{narrow[0].replace("backbone.", "")} {narrow[1]}/'
                f'{narrow[2]} |')
    lines += ['', f'| arm | mean {metric} | mean speed-up |', '|---|---|---|']
    for a in ARMS:
        rs = [rows[(a, s)] for s in args.seeds if (a, s) in rows]
        if rs:
            scores = ', '.join(f'{r["score"]:.2f}' for r in rs)
            lines.append(
                f'| {a} | {statistics.mean(r["score"] for r in rs):.2f} '
                f'({scores}) | '
                f'{statistics.mean(r["speedup"] for r in rs):.2f}x |')
    lines.append('\nkept width per group (kept/size):')
    for a in ARMS:
        for seed in args.seeds:
            r = rows.get((a, seed))
            if r is None or a == 'reference':
                continue
            lines.append(f'- {a} seed {seed}: ' + ', '.join(
                f'{n.replace("backbone.", "")} {k}/{s}'
                for n, k, s in r['widths']))
            if r['degenerate'] or r['one_channel']:
                lines.append(f'  DEGENERATE: {r["degenerate"]}')
            ties = r.get('tp', {}).get('ties')
            if ties:
                lines.append(f'  TIED TP scores in {len(ties)} group(s): '
                             f'{ties[:4]}')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('tasks', nargs='+', choices=sorted(SETUPS))
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    p.add_argument('--jobs', type=int, default=2, help='trainings at once')
    p.add_argument('--tp', nargs='+', choices=('taylor', 'magnitude'),
                   default=['taylor', 'magnitude'])
    p.add_argument('--cls-sparsity', type=float, default=0.5,
                   help="cpd_mm's target (latency) for the classifier")
    p.add_argument('--seg-sparsity', type=float, default=0.5,
                   help="cpd_mm's target (latency) for the segmenter")
    p.add_argument('--cls-baseline', help='default: ' + SETUPS['cls']['ckpt'])
    p.add_argument('--seg-baseline', help='default: ' + SETUPS['seg']['ckpt'])
    p.add_argument('--taylor-batches', type=int, default=4)
    p.add_argument('--tol', type=float, default=0.03,
                   help='latency match of TP to cpd_mm (relative)')
    p.add_argument('--max-bisect', type=int, default=10)
    p.add_argument('--repeats', type=int, default=5,
                   help='interleaved timings of the final models; the '
                   'median speed-up is reported')
    p.add_argument('--no-distill-arm', action='store_true',
                   help='also run cpd_mm without distillation '
                   '(cpd_mm_nokd): separates selection from distillation')
    p.add_argument('--work-dir', default='work_dirs/compare_tp')
    p.add_argument('--rerun', action='store_true')
    p.add_argument('--json', default='benchmarks/compare_torch_pruning.json')
    args = p.parse_args(argv)
    args.sparsity = dict(cls=args.cls_sparsity, seg=args.seg_sparsity)
    for t in ('cls', 'seg'):
        SETUPS[t]['ckpt'] = getattr(args, f'{t}_baseline') or SETUPS[t]['ckpt']
    for t in args.tasks:
        if not osp.exists(osp.join(ROOT, SETUPS[t]['ckpt'])):
            p.error(f'baseline {SETUPS[t]["ckpt"]} not found: train '
                    f'{SETUPS[t]["base"]} or pass --{t}-baseline')
    return args


def main(argv=None):
    args = parse_args(argv)
    start, timings, rows = time.time(), {}, {}
    # 1. cpd_mm and reference arms (the first segmenter run measures the
    #    latency table, which the second then finds in the cache)
    jobs = []
    for arm in ('cpd_mm', 'reference') + (
            ('cpd_mm_nokd', ) if args.no_distill_arm else ()):
        for task in args.tasks:
            for seed in args.seeds:
                jobs.append((task, arm, seed))
    jobs.sort(key=lambda j: (j[1] == 'cpd_mm_nokd', j[2], j[1] != 'cpd_mm'))
    done = pool_map([lambda j=j: run_arm(args, *j, SETUPS[j[0]]['ckpt'])
                     for j in jobs], args.jobs)
    for (task, arm, seed), row in zip(jobs, done):
        rows[(task, arm, seed)] = row
    timings['train_cpd_reference_s'] = round(time.time() - start)
    # 2. TP selections at cpd_mm's measured latency (alone)
    t = time.time()
    selected = {}
    for task in args.tasks:
        own = {(a, s): r for (tk, a, s), r in rows.items() if tk == task}
        for key, val in select_all(args, task, own).items():
            selected[(task, *key)] = val
    timings['tp_select_s'] = round(time.time() - t)
    # 3. fine-tune TP's models with the reference arm's settings
    t = time.time()
    jobs = sorted(selected)
    done = pool_map([lambda k=k: run_arm(args, k[0], f'tp_{k[1]}', k[2],
                                         selected[k][0]) for k in jobs],
                    args.jobs)
    for (task, imp, seed), row in zip(jobs, done):
        row['tp'] = selected[(task, imp, seed)][1]
        rows[(task, f'tp_{imp}', seed)] = row
    timings['train_tp_s'] = round(time.time() - t)
    # 4. final measurements (alone) and tables
    t = time.time()
    text, out = [], dict(args={k: v for k, v in vars(args).items()},
                         setups=SETUPS, rows=[])
    for task in args.tasks:
        own = {(a, s): r for (tk, a, s), r in rows.items() if tk == task}
        measure_final(args, task, own)
        text.append(report(args, task, own))
        out['rows'] += [dict(r, task=task) for r in own.values()]
    timings['measure_s'] = round(time.time() - t)
    timings['total_s'] = round(time.time() - start)
    out['timings'] = timings
    print('\n'.join(text))
    print(f'\ntimings: {timings}')
    dump_json(out, osp.join(ROOT, args.json))
    print(f'results written to {args.json}')


if __name__ == '__main__':
    main()
