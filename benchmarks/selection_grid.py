"""Selection quality at equal measured latency: cpd_mm's channel selection
against Torch-Pruning's (TP), on tasks where selection matters.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/selection_grid.py run \\
        --task cls > /tmp/selection_grid_cls.log 2>&1 &   # resumable
    python benchmarks/selection_grid.py report --task cls  # JSON + plot

A task is a module ``selection_task_<task>.py`` (data, model, loss,
metric, defaults; ``cls``: 24-class ``fine_shapes`` with a half-width
ResNet-18; ``cls40``: the same classifier on 40 classes). Its baseline is
trained once (``--base-epochs``; with ``--per-seed-baseline``, the
default of ``cls40``, once per seed); every arm starts from it, gets the
same fine-tuning budget (``--epochs``, no distillation in any arm) and is
evaluated on the same validation set.
Arms (see ``selection_arms.py``):

* ``cpd_mm``: CPDPruningHook's default selection (``CPD_OPTIONS``), latency
  target ``point`` (0.3, 0.5, 0.7 of the latency removed), pruning on a
  ramp during fine-tuning;
* ``tp_taylor`` / ``tp_hessian_nonorm`` / ``tp_magnitude_nonorm``: TP's
  MetaPruner (global), each importance at its best setting in the option
  study, one shot; its ``pruning_ratio`` bisected so that the model's
  onnxruntime latency equals the ``cpd_mm`` model's of the same point and
  seed (timed interleaved, within ``--tol``); then fine-tuned;
* ``reference``: the unpruned model fine-tuned with the same budget;
* the option study, at ``--study-point`` only (named in ``--arms``):
  cpd_mm's options (``STUDY_ARMS``: the paper's selection ``cpd_paper``,
  the estimators, memory normalisation, mean over coupled layers, ranking
  by score) and TP's other group reductions and normalisers.

Every finished run is appended as one JSON line to ``--results``; a run
whose key (task, arm, point, seed) is there is skipped, so an interrupted
grid continues where it stopped. Pruned models are kept in ``--work-dir``
(TP's arms are matched to the ``cpd_mm`` model of their point and seed).
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time

os.environ.setdefault('OMP_NUM_THREADS', '1')
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
from selection_arms import CPD_OPTIONS  # noqa: E402

# TP's importances with each group reduction / normaliser: TP's defaults
# (mean over coupled layers, mean-normalised per group), '_sum' (summed over
# coupled layers), '_nonorm' (no per-group normaliser)
TP_OPTIONS = {f'tp_{kind}{suffix}': (kind, opts)
              for kind in ('taylor', 'hessian', 'magnitude')
              for suffix, opts in (('', {}),
                                   ('_sum', dict(group_reduction='sum')),
                                   ('_nonorm', dict(normalizer=None)))}
# the main grid's TP arms: each importance with its best setting in the
# option study at 50% (docs/selection_benchmark.md)
TP_ARMS = ('tp_taylor', 'tp_hessian_nonorm', 'tp_magnitude_nonorm')
TP_STUDY = tuple(a for a in TP_OPTIONS if a not in TP_ARMS)
MAIN_ARMS = ('cpd_mm', ) + TP_ARMS
# cpd_mm's options, each a change of the default (selection_arms.CPD_OPTIONS)
STUDY_ARMS = {
    # the paper's selection: batch-gradient Hessian score, memory-normalised,
    # ranked by score
    'cpd_paper': dict(importance='hessian', ranking='score',
                      memory_norm=True),
    'cpd_hessian': dict(importance='hessian'),  # batch-gradient estimator
    'cpd_fisher': dict(importance='fisher'),  # per-sample estimator
    'cpd_memnorm': dict(memory_norm=True),
    'cpd_mean': dict(reduce='mean'),
    'cpd_taylor': dict(importance='taylor'),
    'cpd_hessian_fd': dict(importance='hessian_fd'),
    'cpd_score': dict(ranking='score'),  # global score order, no cost
    'cpd_fisher_score': dict(importance='fisher', ranking='score'),
    # not a selection: the pruning ramp over the first 20% of fine-tuning
    # (default 40%), so more of the budget trains the final structure
    'cpd_ramp20': dict(ramp=0.2),
}
STUDY_ARMS = {a: o for a, o in STUDY_ARMS.items()
              if any(CPD_OPTIONS.get(k) != v for k, v in o.items())}
ALL_ARMS = ('reference', *MAIN_ARMS, *STUDY_ARMS, *TP_STUDY)


def jobs(args):
    """(arm, point, seed) in the order they run: each seed's reference and
    main arms first (middle point first), then the option study."""
    order = sorted(args.points, key=lambda p: abs(p - 0.5))
    out = []
    for seed in args.seeds:
        if 'reference' in args.arms:
            out.append(('reference', None, seed))
        out += [(a, p, seed) for p in order for a in MAIN_ARMS
                if a in args.arms]
    out += [(a, args.study_point, s) for s in args.seeds
            for a in (*STUDY_ARMS, *TP_STUDY) if a in args.arms]
    return out


def key(arm, point, seed, task='cls'):
    return f'{task}/{arm}/{point}/{seed}'


def load_task(name):
    """The task module ``selection_task_<name>.py``."""
    import importlib
    return importlib.import_module(f'selection_task_{name}')


def read_results(path):
    """Finished rows by key (a torn last line, from a kill, is ignored)."""
    rows = {}
    if osp.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows[r['key']] = r
    return rows


def append_result(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------ runs
BASE_SEED = 1234  # the baseline's initial weights and data order


def new_baseline_model(task, width, seed=BASE_SEED):
    """The task's model with the same initial weights in every process:
    built under ``seed`` (torch's global RNG starts from another seed in
    every process), the global RNG left as it was."""
    import torch
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return task.build_model(width)


def baseline_seed(args, seed):
    """The seed of the baseline run ``seed`` starts from (its initial
    weights and data order)."""
    return BASE_SEED + seed if args.per_seed_baseline else BASE_SEED


class Grid:
    """The shared start (data, trained baseline, latency table) and one
    method per kind of arm."""

    def __init__(self, args, seed):
        import selection_arms as sa
        self.args, self.sa = args, sa
        self.task = task = load_task(args.task)
        os.makedirs(args.work_dir, exist_ok=True)
        self.data = task.load_data(args.work_dir, args.num_train,
                                   args.num_val)
        self.bases = {}
        # the latency table and the timings depend on the graph, not on
        # the weights: one baseline serves every seed's
        self.base = self.baseline(seed)
        self.table = sa.latency_table(task, self.base)
        self.timer = sa.Timer(task)
        self.base_sess = self.timer.session(self.base)

    def baseline(self, seed):
        """The trained baseline seed ``seed``'s arms start from: one for
        every seed, or with ``per_seed_baseline`` one per seed (its own
        initial weights and data order), so that a cell's seeds are
        independent draws. Trained on first use, kept in the work
        directory."""
        import torch
        bseed = baseline_seed(self.args, seed)
        if bseed in self.bases:
            return self.bases[bseed][0]
        path = baseline_path(self.args, seed)
        base = new_baseline_model(self.task, self.args.width, bseed)
        if osp.exists(path):
            base.load_state_dict(torch.load(path))
        else:
            t = time.time()
            self.sa.train(self.task, base, self.data, self.args.base_epochs,
                          self.args.base_lr, seed=bseed)
            torch.save(base.state_dict(), path + '.tmp')
            os.replace(path + '.tmp', path)
            print(f'baseline (seed {bseed}) trained in {time.time() - t:.0f}'
                  ' s', flush=True)
        score = self.task.evaluate(base, self.data)
        print(f'baseline (seed {bseed}) {self.task.METRIC} {score:.2f}',
              flush=True)
        self.bases[bseed] = (base, score)
        return base

    def model_path(self, arm, point, seed):
        return osp.join(self.args.work_dir, 'models', f'{self.args.task}_w'
                        f'{self.args.width}_{arm}_{point}_{seed}.pth')

    def start(self, seed):
        import copy
        return copy.deepcopy(self.baseline(seed))

    def cpd(self, arm, point, seed):
        opts = dict(self.sa.CPD_OPTIONS, **STUDY_ARMS.get(arm, {}))
        model, plan, info = self.sa.cpd_prune(
            self.task, self.start(seed), self.data, point, self.args.epochs,
            self.args.lr, seed, self.args.round_to, self.table,
            interval=self.args.interval, **opts)
        return model, dict(info, options=opts, plan=plan)

    def load_pruned(self, arm, point, seed):
        import torch
        from cpd_mm.prune import apply_plan
        saved = torch.load(self.model_path(arm, point, seed))
        model = apply_plan(self.task.build_model(self.args.width),
                           saved['plan'])
        model.load_state_dict(saved['state_dict'])
        return model

    def tp(self, arm, point, seed):
        """Bisect TP's ratio to the cpd_mm model's measured latency."""
        sa, (kind, imp_options) = self.sa, TP_OPTIONS[arm]
        if not osp.exists(self.model_path('cpd_mm', point, seed)):
            raise FileNotFoundError(
                f"{arm} is matched to cpd_mm's model of point {point}, seed "
                f"{seed}, which is not in {self.args.work_dir}: delete "
                f"cpd_mm's line of that run from {self.args.results} and run "
                'again')
        target = self.timer.session(self.load_pruned('cpd_mm', point, seed))
        base = self.baseline(seed)
        stats = sa.tp_statistics(self.task, base, self.data, kind, seed)
        lo, hi, best, trials = 0.0, 0.95, None, []
        for _ in range(self.args.max_bisect):
            ratio = round((lo + hi) / 2, 4)
            model, _ = sa.tp_prune(self.task, base, kind, ratio, stats,
                                   self.args.round_to, **imp_options)
            ms = self.timer.time([target, self.timer.session(model)],
                                 runs=self.args.runs // 2)
            rel = ms[1] / ms[0]
            trials.append((ratio, round(rel, 4)))
            if best is None or abs(rel - 1) < abs(best[1] - 1):
                best = (ratio, rel, model)
            if abs(rel - 1) <= self.args.tol:
                break
            lo, hi = (ratio, hi) if rel > 1 else (lo, ratio)
        ratio, rel, model = best
        sa.train(self.task, model, self.data, self.args.epochs,
                 self.args.lr, seed)
        return model, dict(tp_ratio=ratio, tp_options=imp_options,
                           tp_vs_cpd_at_selection=rel, trials=trials)

    def reference(self, arm, point, seed):
        model = self.start(seed)
        self.sa.train(self.task, model, self.data, self.args.epochs,
                      self.args.lr, seed)
        return model, {}

    def run(self, arm, point, seed):
        import torch
        from cpd_mm.deploy import model_complexity
        t = time.time()
        fn = self.reference if arm == 'reference' else \
            self.tp if arm in TP_OPTIONS else self.cpd
        model, info = fn(arm, point, seed)
        plan = info.pop('plan', None)
        if arm == 'cpd_mm' or arm in STUDY_ARMS:  # TP's are matched to it
            os.makedirs(osp.dirname(self.model_path(arm, point, seed)),
                        exist_ok=True)
            torch.save(dict(plan=plan, state_dict=model.state_dict()),
                       self.model_path(arm, point, seed))
        run_key = key(arm, point, seed, self.args.task)
        torch.save(model, final_path(self.args, run_key))
        score = self.task.evaluate(model, self.data)
        ms = self.timer.time([self.base_sess, self.timer.session(model)],
                             runs=self.args.runs)
        row = dict(key=run_key, task=self.args.task, arm=arm, point=point,
                   seed=seed, metric=self.task.METRIC, score=score,
                   base_score=self.bases[baseline_seed(self.args, seed)][1],
                   ms=ms[1], base_ms=ms[0], rel_latency=ms[1] / ms[0],
                   **model_complexity(model, (1, 3, *self.task.SHAPE)),
                   seconds=round(time.time() - t), **info,
                   setup=setup(self.args))
        return row


def baseline_path(args, seed):
    """The trained baseline the arms of ``seed`` start from (and are timed
    against)."""
    tail = f'_s{seed}' if args.per_seed_baseline else ''
    return osp.join(args.work_dir, f'{args.task}_baseline_w{args.width}'
                    f'_n{args.num_train}_e{args.base_epochs}{tail}.pth')


def final_path(args, run_key):
    """Where a run's final model (the whole module) is kept, for
    ``remeasure``."""
    path = osp.join(args.work_dir, 'final', run_key.replace('/', '_') +
                    f'_w{args.width}.pt')
    os.makedirs(osp.dirname(path), exist_ok=True)
    return path


def setup(args):
    out = dict(task=args.task, width=args.width, num_train=args.num_train,
               num_val=args.num_val,
               base_epochs=args.base_epochs, epochs=args.epochs, lr=args.lr,
               round_to=args.round_to, interval=args.interval, kd='none')
    if args.per_seed_baseline:  # (absent from the one-baseline setups)
        out['per_seed_baseline'] = True
    task = load_task(args.task)
    if hasattr(task, 'optimizer'):  # the task's own, not the generic SGD
        out['optimizer'] = f'{task.__name__}.optimizer'
    return out


def claim_work_dir(args):
    """A work directory keeps one setup's models per task: TP's arms are
    matched to the ``cpd_mm`` model kept there, and a run with another
    budget would overwrite it under the same name. The first run writes
    the setup next to the models; a run of another setup is refused."""
    path = osp.join(args.work_dir, 'models', f'{args.task}_setup.json')
    mine = setup(args)
    if osp.exists(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs != mine:
            sys.exit(f'{osp.dirname(path)} holds {args.task} models of '
                     f'another setup ({theirs}), not {mine}: pass another '
                     '--work-dir (the data and the baseline can be linked '
                     'into it)')
        return
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(mine, f, indent=1)
    os.replace(path + '.tmp', path)


def run(args):
    done = read_results(args.results)
    other = {json.dumps(r['setup'], sort_keys=True) for r in done.values()
             if 'setup' in r} - {json.dumps(setup(args), sort_keys=True)}
    if other:
        sys.exit(f'{args.results} holds runs of another setup ({other.pop()}'
                 f'), not {setup(args)}: pass the same options or another '
                 '--results')
    todo = [j for j in jobs(args) if key(*j, args.task) not in done]
    print(f'{len(todo)} runs to do ({len(jobs(args)) - len(todo)} done)',
          flush=True)
    if not todo:
        return
    claim_work_dir(args)
    grid = Grid(args, todo[0][2])
    for arm, point, seed in todo:
        row = grid.run(arm, point, seed)
        append_result(args.results, row)
        print(f'{row["key"]}: {row["metric"]} {row["score"]:.2f}, latency '
              f'{row["rel_latency"]:.3f} of the baseline, '
              f'{row["seconds"]} s', flush=True)


# ------------------------------------------------------------ report
def summarise(rows, tol=0.03):
    """Mean and spread of the metric and relative latency per (arm,
    point); for TP's arms, how many seeds' selections were matched to
    cpd_mm's latency within ``tol``."""
    cells = {}
    for r in rows:
        cells.setdefault((r['arm'], r['point']), []).append(r)
    out = []
    for (arm, point), rs in sorted(cells.items(), key=lambda c: (
            c[0][0], c[0][1] or 0)):
        acc = [r['score'] for r in rs]
        lat = [r['rel_latency'] for r in rs]
        out.append(dict(
            arm=arm, point=point, seeds=sorted(r['seed'] for r in rs),
            score_mean=statistics.mean(acc), score_min=min(acc),
            score_max=max(acc), score_std=statistics.stdev(acc)
            if len(acc) > 1 else 0.0, rel_latency_mean=statistics.mean(lat),
            rel_latency_min=min(lat), rel_latency_max=max(lat)))
        if arm in TP_OPTIONS:
            out[-1]['matched'] = sum(
                abs(r['tp_vs_cpd_at_selection'] - 1) <= tol for r in rs)
    return out


def interpolate(curve, x):
    """Linear interpolation of ``curve`` ([(x, y)], any order) at ``x``;
    None outside its range."""
    curve = sorted(curve)
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def paired(rows, arm, point):
    """Seed by seed, cpd_mm's lead over ``arm`` at ``point``: cpd_mm's
    curve of the same seed (its reference as the unpruned end) read at
    that seed's TP latency, less TP's score; the seeds share a start and a
    data order, so their differences, not the spread of the two means,
    tell a lead from seed noise. Mean, standard error and the seeds ahead;
    None where no seed has both."""
    by_seed = {}
    for seed in sorted({r['seed'] for r in rows}):
        mine = [r for r in rows if r['seed'] == seed]
        tp = next((r for r in mine if (r['arm'], r['point']) ==
                   (arm, point)), None)
        own = next((r for r in mine if (r['arm'], r['point']) ==
                    ('cpd_mm', point)), None)
        if tp is None or own is None:
            continue
        curve = [(r['rel_latency'], r['score']) for r in mine
                 if r['arm'] in ('cpd_mm', 'reference')]
        at = interpolate(curve, tp['rel_latency'])
        by_seed[seed] = (own['score'] if at is None else at) - tp['score']
    if not by_seed:
        return None
    d = list(by_seed.values())
    return dict(by_seed=by_seed, mean=statistics.mean(d),
                se=statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1
                else None, seeds_ahead=f'{sum(x > 0 for x in d)}/{len(d)}')


def compare(summary, tp_arms=tuple(TP_OPTIONS), rows=None):
    """Per latency point: cpd_mm's mean against TP's best arm there, the
    one closest to (or above) cpd_mm's curve read at TP's own measured
    latency (where TP could not reach cpd_mm's latency, its raw score is
    no measure: a slower model scores higher), and the same-budget
    reference. With the ``rows``, also the seed-by-seed (paired) lead over
    that arm."""
    cells = {(s['arm'], s['point']): s for s in summary}
    cpd = [s for s in summary if s['arm'] == 'cpd_mm']
    ref = next((s for s in summary if s['arm'] == 'reference'), None)
    # (cpd_mm with nothing removed is the reference)
    curve = [(s['rel_latency_mean'], s['score_mean'])
             for s in cpd + ([ref] if ref else [])]
    out = []
    for c in sorted(cpd, key=lambda s: s['point']):
        tps = [cells[a, c['point']] for a in tp_arms
               if (a, c['point']) in cells]
        row = dict(point=c['point'], cpd_mm=c['score_mean'],
                   cpd_mm_rel_latency=c['rel_latency_mean'],
                   reference=ref and ref['score_mean'],
                   cpd_mm_minus_reference=ref and c['score_mean'] -
                   ref['score_mean'])
        if tps:
            def margin(s):  # cpd_mm's lead at TP's latency
                at = interpolate(curve, s['rel_latency_mean'])
                return (c['score_mean'] if at is None else at) - \
                    s['score_mean']
            best = min(tps, key=margin)
            at = interpolate(curve, best['rel_latency_mean'])
            row.update(best_tp=best['arm'], best_tp_score=best['score_mean'],
                       best_tp_rel_latency=best['rel_latency_mean'],
                       best_tp_matched=f"{best['matched']}/"
                       f"{len(best['seeds'])}",
                       cpd_mm_minus_best_tp=c['score_mean'] -
                       best['score_mean'],
                       cpd_mm_at_tp_latency=at,
                       cpd_mm_at_tp_latency_minus_best_tp=None if at is None
                       else at - best['score_mean'])
            if rows is not None:
                row['paired_vs_best_tp'] = paired(rows, best['arm'],
                                                  c['point'])
        out.append(row)
    return out


def plot(summary, path, arms, title, metric):
    """The metric against measured latency, one curve per arm of ``arms``,
    the same-budget unpruned reference marked."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in [a for a in arms if any(s['arm'] == a for s in summary)]:
        pts = sorted((s for s in summary if s['arm'] == arm),
                     key=lambda s: s['rel_latency_mean'])
        ax.errorbar([s['rel_latency_mean'] for s in pts],
                    [s['score_mean'] for s in pts],
                    yerr=[[s['score_mean'] - s['score_min'] for s in pts],
                          [s['score_max'] - s['score_mean'] for s in pts]],
                    marker='o', capsize=3, label=arm,
                    ls='-' if len(pts) > 1 else 'none')
    for s in summary:
        if s['arm'] == 'reference':
            ax.axhline(s['score_mean'], color='k', ls='--', lw=1)
            ax.plot([s['rel_latency_mean']], [s['score_mean']], 'k*', ms=12,
                    label=f'unpruned, same budget ({s["score_mean"]:.1f})')
    ax.set_xlabel('measured latency / unpruned (onnxruntime, CPU, 1 thread)')
    ax.set_ylabel(f'{metric} (%), mean over seeds; bars: min-max')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def remeasure(args):
    """Time every kept final model again with the trained baseline, all
    interleaved, ``--repeats`` times (on a quiet machine); the median ratio
    per run goes to ``<results>.latency.json``, which ``report`` prefers."""
    import torch
    import selection_arms as sa
    task = load_task(args.task)
    rows = read_results(args.results)
    keys = [k for k in rows if osp.exists(final_path(args, k))]
    timer = sa.Timer(task)
    sessions = [timer.session(torch.load(final_path(args, k),
                                         weights_only=False)) for k in keys]
    # timed against the trained baseline, as in the runs: the same graph
    # with random weights runs at another speed (the detector's ~2% faster)
    path = next((p for p in (baseline_path(args, s) for s in args.seeds)
                 if osp.exists(p)), baseline_path(args, args.seeds[0]))
    if not osp.exists(path):
        sys.exit(f'remeasure times every model against the trained baseline '
                 f'{path}, which is not there: pass the --work-dir (and '
                 'setup options) the grid ran with')
    base = task.build_model(args.width)
    base.load_state_dict(torch.load(path))
    base_sess = timer.session(base)
    reps = []
    for r in range(args.repeats):
        ms = timer.time([base_sess] + sessions, runs=args.runs)
        reps.append([m / ms[0] for m in ms[1:]])
        print(f'repeat {r + 1}/{args.repeats} done', flush=True)
    out = {k: dict(rel_latency=statistics.median(rep[i] for rep in reps),
                   repeats=[rep[i] for rep in reps])
           for i, k in enumerate(keys)}
    with open(args.results + '.latency.json', 'w') as f:
        json.dump(dict(runs=args.runs, repeats=args.repeats,
                       rel_latency=out), f, indent=1)
    print(f'remeasured {len(keys)} models')


def report(args):
    rows = list(read_results(args.results).values())
    lat = args.results + '.latency.json'
    if osp.exists(lat):  # quiet-machine timings, where taken
        with open(lat) as f:
            again = json.load(f)['rel_latency']
        for r in rows:
            if r['key'] in again:
                r['rel_latency_run'] = r['rel_latency']
                r['rel_latency'] = again[r['key']]['rel_latency']
    summary = summarise(rows, args.tol)
    comparison = compare(summary, rows=rows)
    out = dict(results=osp.relpath(args.results, ROOT), runs=len(rows),
               summary=summary, comparison=comparison)
    with open(args.json, 'w') as f:
        json.dump(out, f, indent=1)
    task = load_task(args.task)
    title = getattr(task, 'TITLE', args.task)
    plot(summary, args.plot, MAIN_ARMS, f'{title}: {task.METRIC} at '
         'measured latency', task.METRIC)
    # the points the study ran at, from its rows (not --study-point)
    points = sorted({s['point'] for s in summary
                     if s['arm'] in STUDY_ARMS or s['arm'] in TP_STUDY})
    if points:
        at = ', '.join(f'{p:.0%}' for p in points)
        plot(summary, args.plot.replace('.png', '_study.png'),
             ('cpd_mm', *STUDY_ARMS, *TP_ARMS, *TP_STUDY),
             f'{title}:\noptions at {at} of the latency removed',
             task.METRIC)
    print(f'| arm | point | seeds | {task.METRIC} mean (min-max) | '
          'latency / base |')
    print('|---|---|---|---|---|')
    for s in summary:
        print(f'| {s["arm"]} | {s["point"]} | {len(s["seeds"])} | '
              f'{s["score_mean"]:.2f} ({s["score_min"]:.2f}-'
              f'{s["score_max"]:.2f}) | {s["rel_latency_mean"]:.3f} |')
    print('\n| point | cpd_mm | best TP arm | TP | TP latency (matched '
          'seeds) | cpd_mm - TP | cpd_mm at TP latency - TP | paired, '
          'seed by seed: mean +- s.e. (seeds ahead) | cpd_mm - reference |')
    print('|---|---|---|---|---|---|---|---|---|')
    for c in comparison:
        cells = [c['point'], f'{c["cpd_mm"]:.2f} at '
                 f'{c["cpd_mm_rel_latency"]:.3f}']
        if 'best_tp' in c:
            at = c['cpd_mm_at_tp_latency_minus_best_tp']
            cells += [c['best_tp'], f'{c["best_tp_score"]:.2f}',
                      f'{c["best_tp_rel_latency"]:.3f} '
                      f'({c["best_tp_matched"]})',
                      f'{c["cpd_mm_minus_best_tp"]:+.2f}',
                      '-' if at is None else f'{at:+.2f}']
            p = c.get('paired_vs_best_tp')
            se = '-' if p is None or p['se'] is None else f'{p["se"]:.2f}'
            cells.append('-' if p is None else f'{p["mean"]:+.2f} +- {se} '
                         f'({p["seeds_ahead"]})')
        else:
            cells += ['-'] * 6
        cells.append('-' if c['reference'] is None else
                     f'{c["cpd_mm_minus_reference"]:+.2f}')
        print('| ' + ' | '.join(map(str, cells)) + ' |')
    print(f'wrote {args.json} and {args.plot}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('command', choices=('run', 'report', 'remeasure', 'list'))
    p.add_argument('--task', default='cls', help='the task module '
                   'benchmarks/selection_task_<task>.py: cls, seg, det')
    p.add_argument('--repeats', type=int, default=5,
                   help='remeasure: interleaved timings of every model')
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    p.add_argument('--points', nargs='+', type=float,
                   default=[0.3, 0.5, 0.7], help='latency share removed')
    p.add_argument('--study-point', type=float, default=0.5)
    p.add_argument('--arms', nargs='+', help='default: the reference, the '
                   "main arms and the task's EXTRA_ARMS")
    p.add_argument('--width', type=int, help="the model's first-stage "
                   'channels (default: the task\'s)')
    p.add_argument('--num-train', type=int)
    p.add_argument('--num-val', type=int)
    p.add_argument('--base-epochs', type=int)
    p.add_argument('--base-lr', type=float)
    p.add_argument('--epochs', type=int, help='fine-tuning budget')
    p.add_argument('--lr', type=float)
    p.add_argument('--per-seed-baseline', action='store_true', default=None,
                   help='one baseline per seed (default: the task\'s)')
    p.add_argument('--round-to', type=int, help='channel multiple of every '
                   'arm (onnxruntime CPU convolutions work in blocks of 16)')
    p.add_argument('--interval', type=int, default=16,
                   help="iterations between cpd_mm's pruning steps")
    p.add_argument('--tol', type=float, default=0.03)
    p.add_argument('--max-bisect', type=int, default=8)
    p.add_argument('--runs', type=int, default=2000,
                   help='timed inferences of each final model')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs',
                                                  'selection_grid'))
    p.add_argument('--results', help='default: benchmarks/'
                   'selection_grid_<task>.jsonl')
    p.add_argument('--json', help='default: benchmarks/'
                   'selection_grid_<task>.json')
    p.add_argument('--plot', help='default: docs/img/'
                   'selection_grid_<task>.png')
    args = p.parse_args(argv)
    try:
        task = load_task(args.task)
    except ImportError as e:
        p.error(f'no task module for --task {args.task!r} ({e})')
    for k, v in {'per_seed_baseline': False, **task.DEFAULTS}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k, d, ext in (('results', 'benchmarks', 'jsonl'),
                      ('json', 'benchmarks', 'json'),
                      ('plot', osp.join('docs', 'img'), 'png')):
        if getattr(args, k) is None:
            setattr(args, k, osp.join(ROOT, d,
                                      f'selection_grid_{args.task}.{ext}'))
    if args.arms is None:
        args.arms = ['reference', *MAIN_ARMS,
                     *getattr(task, 'EXTRA_ARMS', ())]
    bad = sorted(set(args.arms) - set(ALL_ARMS))
    if bad:
        p.error(f'unknown arms {bad}: choose from {", ".join(ALL_ARMS)}')
    if 'cpd_mm' not in args.arms and set(args.arms) & set(TP_OPTIONS):
        p.error("TP's arms are matched to cpd_mm's latency: keep cpd_mm in "
                '--arms')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == 'run':
        run(args)
    elif args.command == 'report':
        report(args)
    elif args.command == 'remeasure':
        remeasure(args)
    else:
        done = read_results(args.results)
        for j in jobs(args):
            k = key(*j, args.task)
            print(k, 'done' if k in done else 'todo')


if __name__ == '__main__':
    main()
