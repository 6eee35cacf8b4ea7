"""Is pruning exact on every MMDetection detector the project tests?

For each detector (the ones in tests/ and the shipped configs), at 128x128
and 256x256, with three seeds: ``tools/check_pruning.py`` (build with random
weights, comb with self-verification, remove a random 50% of every prunable
group, compare gated and physically pruned outputs on re-drawn weights).
Two-stage detectors run their RoI heads on comb's fixed proposals
(``cpd_mm.comb.forward.fixed_proposals``), so the verdict does not depend on
which boxes an NMS over near-tied scores keeps.

    OMP_NUM_THREADS=1 python benchmarks/detector_exactness.py
    python benchmarks/detector_exactness.py --only mask_rcnn --sizes 256
    python benchmarks/detector_exactness.py --report

Each check runs in its own subprocess; results are appended to
``benchmarks/detector_exactness.json`` as they finish, so an interrupted run
resumes (``--rerun`` redoes cached ones).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_JSON = osp.join(REPO, 'benchmarks', 'detector_exactness.json')

# name -> config (mmdet:: is resolved in MMDetection's installed configs)
DETECTORS = {
    'faster_rcnn': 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'mask_rcnn': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    'cascade_rcnn': 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
    'retinanet': 'configs/cpd/retinanet_r50_fpn_coco_prune.py',
    'fcos': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    'rtmdet_tiny': 'configs/cpd/rtmdet_tiny_coco_prune.py',
    'rtmdet_demo': 'configs/demo/rtmdet_demo-det.py',
}


def config_path(spec):
    if spec.startswith('mmdet::'):
        from mmengine.utils import get_installed_path
        return osp.join(get_installed_path('mmdet'), '.mim', 'configs',
                        spec[len('mmdet::'):])
    return osp.join(REPO, spec)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', nargs='+', default=list(DETECTORS),
                   choices=list(DETECTORS))
    p.add_argument('--sizes', type=int, nargs='+', default=[128, 256])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--timeout', type=float, default=1800)
    p.add_argument('--rerun', action='store_true')
    p.add_argument('--json', default=DEFAULT_JSON)
    p.add_argument('--report', action='store_true',
                   help='only print the table from the JSON')
    return p.parse_args(argv)


def run_one(name, size, seed, timeout):
    """One check_pruning run; its JSON report plus the exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = osp.join(tmp, 'report.json')
        cmd = [sys.executable, osp.join(REPO, 'tools', 'check_pruning.py'),
               config_path(DETECTORS[name]), '--shape', str(size), str(size),
               '--seed', str(seed), '--json', out]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            return dict(status='timeout', seconds=timeout)
        seconds = time.perf_counter() - t0
        if not osp.isfile(out):
            return dict(status='error', seconds=seconds, rc=proc.returncode,
                        tail=(proc.stdout + proc.stderr)[-2000:])
        with open(out) as f:
            report = json.load(f)
    report.update(status='exact' if proc.returncode == 0 else 'differs',
                  seconds=seconds, rc=proc.returncode)
    return report


def table(results):
    rows = ['| detector | size | seeds | verdict | max rel. diff | '
            'prunable groups | FLOPs (G, before -> after) | s per check |',
            '|---|---|---|---|---|---|---|---|']
    by = {}
    for key, r in results.items():
        name, size, seed = key.rsplit('/', 2)
        by.setdefault((name, int(size)), []).append((int(seed), r))
    for (name, size), runs in sorted(by.items()):
        runs.sort()
        verdicts = {r['status'] for _, r in runs}
        diff = max((r.get('max_rel_diff') or 0.0) for _, r in runs)
        flops = runs[0][1].get('flops') or [None, None]
        fl = '-' if flops[0] is None else \
            f'{flops[0] / 1e9:.2f} -> {flops[1] / 1e9:.2f}'
        secs = sum(r.get('seconds', 0) for _, r in runs) / len(runs)
        rows.append(
            f'| {name} | {size} | {",".join(str(s) for s, _ in runs)} | '
            f'{"/".join(sorted(verdicts))} | {diff:.1e} | '
            f'{runs[0][1].get("prunable", "-")} | {fl} | {secs:.0f} |')
    return '\n'.join(rows)


def main(argv=None):
    args = parse_args(argv)
    results = {}
    if osp.isfile(args.json):
        with open(args.json) as f:
            results = json.load(f).get('results', {})
    if not args.report:
        for name in args.only:
            for size in args.sizes:
                for seed in args.seeds:
                    key = f'{name}/{size}/{seed}'
                    if key in results and not args.rerun:
                        continue
                    r = run_one(name, size, seed, args.timeout)
                    results[key] = r
                    print(f'{key}: {r["status"]} '
                          f'(max rel. diff {r.get("max_rel_diff")}, '
                          f'{r["seconds"]:.0f} s)', flush=True)
                    tmp = args.json + '.tmp'
                    with open(tmp, 'w') as f:
                        json.dump(dict(
                            meta=dict(omp=os.environ.get('OMP_NUM_THREADS'),
                                      command=' '.join(sys.argv)),
                            results=results), f, indent=1)
                    os.replace(tmp, args.json)
    print(table(results))
    bad = [k for k, r in results.items() if r['status'] != 'exact']
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
