"""Zoo coverage: is pruning exact on every model family the ecosystem ships?

For one config of every model family of MMPretrain and MMSegmentation (the
configs installed with the packages) and every torchvision classification
and segmentation family, with random weights: build, comb, remove a random
50% of every prunable group (``tools/check_pruning.py``'s plan), gate,
prune physically, and compare gated vs pruned outputs (float64, relative
tolerance 1e-6; float32 / 1e-4 where the model does not run in float64)
on a copy with generic weights (``--weights generic``, the default: every
weight, statistic, layer scale and bias re-drawn, so no branch that is
silent at initialisation hides a wrong rule; ``--weights own`` compares on
the model as built, as runs before this option did).

    OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --subset ci
    OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py           # all
    python benchmarks/zoo_coverage.py --families convnext swin --rerun
    python benchmarks/zoo_coverage.py --report   # table from the JSON only
    python benchmarks/zoo_coverage.py --list
    python benchmarks/zoo_coverage.py --report --changes-from OLD.json

Each model runs in its own subprocess with a timeout (a model that hangs or
kills the interpreter does not stop the run); results are cached in
``benchmarks/zoo_coverage.json`` after every model, so an interrupted run
resumes where it stopped (``--rerun`` / ``--rerun-failed`` redo cached
ones). The table goes to ``docs/zoo_coverage.md``. ``--verify`` /
``--no-verify`` pass ``verify=`` to ``comb_model`` when it accepts it (a
cached result counts only for the same setting).

Every model also gets a second, "mixed" plan (each group loses its own
random share), and a differing model reports the first leaf module whose
output differs. ``benchmarks/zoo_repros.py`` holds minimal repros of the
failing constructs; docs/zoo_failures.md is the survey.
"""
import argparse
import datetime
import fnmatch
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_JSON = osp.join(REPO, 'benchmarks', 'zoo_coverage.json')
DEFAULT_MD = osp.join(REPO, 'docs', 'zoo_coverage.md')
FAILED = ('differs', 'raises', 'comb fails', 'build fails', 'forward fails',
          'timeout', 'crashed')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--subset', choices=['ci', 'all'], default='all')
    p.add_argument('--only', nargs='+', default=[], metavar='KEY',
                   help='entries by key or glob (e.g. mmseg/ocrnet, tv/*)')
    p.add_argument('--families', nargs='+', default=[], metavar='NAME',
                   help='entries whose family is one of these')
    p.add_argument('--codebase', nargs='+', default=[],
                   choices=['mmpretrain', 'mmseg', 'torchvision'])
    v = p.add_mutually_exclusive_group()
    v.add_argument('--verify', dest='verify', action='store_true',
                   default=None, help="comb_model(verify=True) if accepted")
    v.add_argument('--no-verify', dest='verify', action='store_false')
    p.add_argument('--weights', choices=['generic', 'own'], default='generic',
                   help='compare on a copy with generic weights (default) '
                   'or on the model as built')
    p.add_argument('--changes-from', metavar='JSON',
                   help='print the entries whose verdict differs from this '
                   'earlier results file')
    p.add_argument('--ratio', type=float, default=0.5)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--timeout', type=float, default=900,
                   help='seconds per model (default 900)')
    p.add_argument('--no-mmengine-flops', action='store_true',
                   help="skip mmengine's FLOP counter (saves two traces)")
    p.add_argument('--rerun', action='store_true',
                   help='ignore cached results of the selected entries')
    p.add_argument('--rerun-failed', action='store_true',
                   help='rerun cached entries that did not come out exact')
    p.add_argument('--in-process', action='store_true',
                   help='no subprocess per model (debugging; no timeout)')
    p.add_argument('--json', default=DEFAULT_JSON)
    p.add_argument('--md', default=DEFAULT_MD)
    p.add_argument('--report', action='store_true',
                   help='only rewrite the markdown from the JSON')
    p.add_argument('--list', action='store_true', help='list entries, exit')
    p.add_argument('--worker', help=argparse.SUPPRESS)
    p.add_argument('--result', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 <= args.ratio < 1:
        p.error(f'--ratio must be in [0, 1), got {args.ratio}')
    return args


def select(args):
    """Entries chosen by --subset/--only/--families/--codebase."""
    from zoo_models import CI_SUBSET, all_entries
    entries = all_entries()
    if args.subset == 'ci':
        entries = [e for e in entries if e.key in CI_SUBSET]
    if args.only:
        entries = [e for e in entries
                   if any(fnmatch.fnmatch(e.key, k) for k in args.only)]
    if args.families:
        entries = [e for e in entries if e.family in args.families]
    if args.codebase:
        entries = [e for e in entries if e.codebase in args.codebase]
    return entries


def run_ci_subset(verify=None, log=print):
    """Check every entry of the CI subset in this process (for the test):
    returns ``{key: result}``."""
    from zoo_check import check_model
    from zoo_models import CI_SUBSET, all_entries
    return {e.key: check_model(e, verify=verify, mmengine_flops=False,
                               log=log)
            for e in all_entries() if e.key in CI_SUBSET}


# ------------------------------------------------------------------ cache
def load_cache(path):
    if osp.isfile(path):
        with open(path) as f:
            return json.load(f)
    return dict(meta={}, results={})


def save_cache(cache, path):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(cache, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def git_commit():
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                             cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(['git', 'status', '--porcelain', 'cpd_mm'],
                               cwd=REPO, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def needs_run(entry, cache, args):
    old = cache['results'].get(entry.key)
    if old is None or args.rerun:
        return True
    if args.rerun_failed and old.get('status') in FAILED:
        return True
    # a result with another verify or weights setting does not answer
    # this run (results from before --weights compared on 'own')
    return old.get('verify_requested') != args.verify or \
        old.get('weights_requested', 'own') != args.weights


def verdict(res):
    """(status, status of the mixed plan) of one result."""
    return res.get('status'), (res.get('mixed') or {}).get('status')


def print_changes(old, new):
    """Entries in both result files whose verdict differs (e.g. a run on
    generic weights against one on the models' own weights)."""
    common = sorted(set(old['results']) & set(new['results']))
    changed = [k for k in common
               if verdict(old['results'][k]) != verdict(new['results'][k])]
    print(f'{len(changed)} of {len(common)} entries in both files changed '
          'verdict (status, mixed-plan status):')
    for k in changed:
        print(f'  {k}: {verdict(old["results"][k])} -> '
              f'{verdict(new["results"][k])}')


# ------------------------------------------------------------------ running
def run_worker(args):
    """Child process: check one entry and write its result JSON."""
    from zoo_check import check_model
    from zoo_models import all_entries
    entry = {e.key: e for e in all_entries()}[args.worker]
    res = check_model(entry, verify=args.verify, ratio=args.ratio,
                      seed=args.seed, weights=args.weights,
                      mmengine_flops=not args.no_mmengine_flops)
    with open(args.result, 'w') as f:
        json.dump(res, f)


def run_one(entry, args):
    """Check ``entry`` in a subprocess with a timeout; never raises."""
    if args.in_process or entry.skip:
        from zoo_check import check_model
        return check_model(entry, verify=args.verify, ratio=args.ratio,
                           seed=args.seed, weights=args.weights,
                           mmengine_flops=not args.no_mmengine_flops)
    fd, out = tempfile.mkstemp(suffix='.json', prefix='zoo_')
    os.close(fd)
    cmd = [sys.executable, osp.abspath(__file__), '--worker', entry.key,
           '--result', out, '--ratio', str(args.ratio), '--seed',
           str(args.seed), '--weights', args.weights]
    if args.verify is not None:
        cmd.append('--verify' if args.verify else '--no-verify')
    if args.no_mmengine_flops:
        cmd.append('--no-mmengine-flops')
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get(
        'OMP_NUM_THREADS', '1'), PYTHONPATH=REPO + os.pathsep +
        os.environ.get('PYTHONPATH', ''))
    base = dict(key=entry.key, codebase=entry.codebase, family=entry.family,
                model=entry.name)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=args.timeout)
        with open(out) as f:
            text = f.read()
        if proc.returncode == 0 and text:
            return json.loads(text)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(base, status='crashed',
                    error=f'exit {proc.returncode}: ' + ' | '.join(tail))
    except subprocess.TimeoutExpired:
        return dict(base, status='timeout',
                    error=f'no result within {args.timeout:.0f} s')
    finally:
        if osp.exists(out):
            os.remove(out)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    from zoo_report import write_markdown
    if args.report:
        write_markdown(load_cache(args.json), args.md)
        print(f'wrote {args.md}')
        if args.changes_from:
            print_changes(load_cache(args.changes_from), load_cache(args.json))
        return
    entries = select(args)
    if args.list:
        for e in entries:
            print(f'{e.key:40s} {e.name}' + (f'  [skip: {e.skip}]'
                                              if e.skip else ''))
        return
    if args.verify is not None:
        from zoo_check import comb_kwargs
        if comb_kwargs(args.verify)[1] is None:
            print('note: comb_model has no `verify` argument in this cpd_mm; '
                  'running without it')
    cache = load_cache(args.json)
    todo = [e for e in entries if needs_run(e, cache, args)]
    print(f'{len(entries)} entries selected, {len(todo)} to run '
          f'({len(entries) - len(todo)} cached)', flush=True)
    commit = git_commit()
    for i, e in enumerate(todo, 1):
        t0 = time.perf_counter()
        res = run_one(e, args)
        res.update(wall_s=round(time.perf_counter() - t0, 1), commit=commit,
                   verify_requested=args.verify,
                   weights_requested=args.weights,
                   date=datetime.date.today().isoformat())
        cache['results'][e.key] = res
        cache['meta'] = dict(ratio=args.ratio, seed=args.seed,
                             python=sys.version.split()[0])
        save_cache(cache, args.json)
        extra = res.get('max_rel_diff')
        extra = f' (max rel diff {extra:.2e})' if extra is not None else ''
        err = f' {res["error"]}' if res.get('error') else ''
        print(f'[{i}/{len(todo)}] {e.key}: {res["status"]}{extra} '
              f'in {res["wall_s"]} s{err}', flush=True)
    write_markdown(cache, args.md)
    print(f'wrote {args.md} and {args.json}')
    if args.changes_from:
        print_changes(load_cache(args.changes_from), cache)


if __name__ == '__main__':
    main()
