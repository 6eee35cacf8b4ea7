"""Ablations on the demo models: importance criteria and distillation.

    python benchmarks/ablation.py cls [--importance hessian taylor l1 random]
        [--distill kl none] [--sparsity 0.5] [--seeds 0] [--json F]
    python benchmarks/ablation.py seg [--distill cwd cirkd none] ...

Every variant starts from the same trained baseline (train it first with
``python tools/train.py configs/demo/<base config>``), runs the demo prune
config with the same fine-tuning budget, and is evaluated through
``tools/test.py`` with the *original* config on its ``pruned_final.pth``.
Prints a table and writes JSON.
"""
import argparse
import itertools
import json
import os.path as osp
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SETUPS = {
    'cls': dict(base='configs/demo/resnet18_demo-cls.py',
                prune='configs/demo/resnet18_demo-cls_prune.py',
                ckpt='work_dirs/resnet18_demo-cls/epoch_12.pth',
                metric=r'accuracy/top1: ([0-9.]+)', distill=['kl', 'none']),
    'seg': dict(base='configs/demo/pspnet_r18_demo-seg.py',
                prune='configs/demo/pspnet_r18_demo-seg_prune.py',
                ckpt='work_dirs/pspnet_r18_demo-seg/epoch_20.pth',
                metric=r'mIoU: ([0-9.]+)', distill=['cwd', 'cirkd', 'none']),
}


def sh(cmd):
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if p.returncode:
        print(p.stdout[-3000:])
        raise SystemExit(f'failed: {" ".join(cmd)}')
    return p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('task', choices=sorted(SETUPS))
    ap.add_argument('--importance', nargs='+', default=['hessian'])
    ap.add_argument('--distill', nargs='+', default=None)
    ap.add_argument('--sparsity', nargs='+', type=float, default=[0.5])
    ap.add_argument('--seeds', nargs='+', type=int, default=[0])
    ap.add_argument('--baseline', help='baseline checkpoint to start from')
    ap.add_argument('--work-dir', default='work_dirs/ablation')
    ap.add_argument('--json', default=None)
    args = ap.parse_args()
    s = SETUPS[args.task]
    ckpt = args.baseline or s['ckpt']
    if not osp.exists(osp.join(ROOT, ckpt)):
        raise SystemExit(f'baseline checkpoint {ckpt} not found: train '
                         f'{s["base"]} first or pass --baseline')
    rows = []
    for imp, dist, sp, seed in itertools.product(
            args.importance, args.distill or s['distill'], args.sparsity,
            args.seeds):
        name = f'{args.task}_{imp}_{dist}_s{int(sp * 100)}_seed{seed}'
        wd = osp.join(args.work_dir, name)
        t = time.time()
        sh([sys.executable, 'tools/train.py', s['prune'], '--work-dir', wd,
            '--cfg-options', f'load_from={ckpt}', f'model.distill={dist}',
            f'custom_hooks.0.importance={imp}',
            f'custom_hooks.0.target_sparsity={sp}',
            f'randomness.seed={seed}'])
        out = sh([sys.executable, 'tools/test.py', s['base'],
                  osp.join(wd, 'pruned_final.pth'), '--work-dir',
                  osp.join(wd, 'test')])
        score = float(re.findall(s['metric'], out)[-1])
        row = dict(task=args.task, importance=imp, distill=dist,
                   sparsity=sp, seed=seed, score=score,
                   seconds=round(time.time() - t, 1))
        rows.append(row)
        print(row, flush=True)
    metric = 'top-1' if args.task == 'cls' else 'mIoU'
    print(f'\n{"importance":10s} {"distill":8s} {"sparsity":>8s} '
          f'{"seed":>4s} {metric:>7s}')
    for r in rows:
        print(f'{r["importance"]:10s} {r["distill"]:8s} {r["sparsity"]:8.2f}'
              f' {r["seed"]:4d} {r["score"]:7.2f}')
    out = args.json or osp.join(ROOT, 'benchmarks',
                                f'ablation_{args.task}.json')
    with open(out, 'w') as f:
        json.dump(dict(baseline=ckpt, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
