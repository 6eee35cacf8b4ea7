"""The main job on the embedded default: Comb, Prune, Distill end to end.

On generated data and this CPU:
  1. write the demo classification set (if missing);
  2. train the baseline classifier and evaluate it;
  3. prune it with Hessian importance and KL distillation to 50% of its
     parameters (snapshots at 10-40% on the way), and evaluate every snapshot
     with the *original* config;
  4. export baseline and pruned model to ONNX, verify, benchmark both;
  5. print one table and write two plots (accuracy vs sparsity, kept
     channels per group) to the work dir.

    python tools/run_demo.py [--work-dir work_dirs/demo] [--runs 1000]
        [--threads 1] [--skip-baseline]

Every step runs the project's own tools (train.py, test.py, export_onnx.py)
as a subprocess, so their logs and progress bars show as they go.
"""
import argparse
import json
import os
import os.path as osp
import re
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
BASE_CFG = 'configs/demo/resnet18_demo-cls.py'
PRUNE_CFG = 'configs/demo/resnet18_demo-cls_prune.py'


def run(cmd, capture=False):
    print(f'\n$ {" ".join(cmd)}', flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if not capture:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        return ''
    out = []
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print(line, end='', flush=True)
            out.append(line)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd)
    return ''.join(out)


def evaluate(cfg, ckpt, work_dir):
    out = run([sys.executable, 'tools/test.py', cfg, ckpt, '--work-dir',
               work_dir], capture=True)
    found = re.findall(r'accuracy/top1: ([0-9.]+)', out)
    if not found:
        raise RuntimeError(f'no accuracy in the output of test.py for {ckpt}')
    return float(found[-1])


def plot_accuracy(points, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    xs, ys = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([100 * x for x in xs], ys, 'o-')
    ax.set_xlabel('parameter sparsity (%)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title('CPD on the demo classifier')
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--runs', type=int, default=1000,
                   help='timed onnxruntime runs per model (default 1000)')
    p.add_argument('--threads', type=int, default=1,
                   help='onnxruntime intra-op threads (default 1: a 1 ms '
                   'model gains nothing from more, its timing gets noisier)')
    p.add_argument('--skip-baseline', action='store_true',
                   help='reuse an existing baseline checkpoint')
    args = p.parse_args()
    t0 = time.time()
    wd = args.work_dir
    base_dir, prune_dir = osp.join(wd, 'baseline'), osp.join(wd, 'cpd')
    os.makedirs(wd, exist_ok=True)
    py = sys.executable

    if not osp.isdir(osp.join(ROOT, 'data/demo/cls/train')):
        run([py, 'tools/make_demo_data.py', 'cls'])
    base_ckpt = osp.join(base_dir, 'epoch_12.pth')
    if not (args.skip_baseline and osp.exists(osp.join(ROOT, base_ckpt))):
        run([py, 'tools/train.py', BASE_CFG, '--work-dir', base_dir])
    acc_base = evaluate(BASE_CFG, base_ckpt, osp.join(wd, 'test_baseline'))

    run([py, 'tools/train.py', PRUNE_CFG, '--work-dir', prune_dir,
         '--cfg-options', f'load_from={base_ckpt}'])
    final = osp.join(prune_dir, 'pruned_final.pth')
    import torch
    import cpd_mm  # noqa: F401  (safe checkpoint loading)
    points = [(0.0, acc_base)]
    for name in sorted(os.listdir(osp.join(ROOT, prune_dir))):
        m = re.match(r'pruned_sparsity_(\d+)\.pth', name)
        if m:
            acc = evaluate(BASE_CFG, osp.join(prune_dir, name),
                           osp.join(wd, 'test_snapshots'))
            points.append((int(m.group(1)) / 100.0, acc))
    meta = torch.load(osp.join(ROOT, final), map_location='cpu')['meta']
    acc_pruned = evaluate(BASE_CFG, final, osp.join(wd, 'test_pruned'))
    points.append((meta['sparsity'], acc_pruned))
    plot_accuracy(points, osp.join(ROOT, wd, 'accuracy_vs_sparsity.png'))

    report = osp.join(wd, 'onnx_compare.json')
    run([py, 'tools/export_onnx.py', BASE_CFG, final, '--out',
         osp.join(wd, 'pruned.onnx'), '--verify', '--benchmark', '--runs',
         str(args.runs), '--threads', str(args.threads),
         '--compare-to', base_ckpt, '--json', report,
         '--force'])
    with open(osp.join(ROOT, report)) as f:
        cmp = json.load(f)['compare']
    o, q = cmp['original'], cmp['pruned']
    rows = [('baseline', o['params'], o['flops'], acc_base,
             o['benchmark']['median_ms'], 1.0),
            ('CPD (hessian + KL)', q['params'], q['flops'], acc_pruned,
             q['benchmark']['median_ms'], cmp['speedup_median'])]
    print('\n' + '=' * 78)
    print(f'{"model":22s} {"params":>10s} {"FLOPs":>10s} {"top-1 %":>8s} '
          f'{"ONNX ms":>8s} {"speed-up":>9s}')
    for r in rows:
        print(f'{r[0]:22s} {r[1] / 1e6:9.3f}M {r[2] / 1e6:9.2f}M {r[3]:8.2f}'
              f' {r[4]:8.3f} {r[5]:8.2f}x')
    print('=' * 78)
    print(f'accuracy vs sparsity: {points}')
    print(f'plots: {osp.join(wd, "accuracy_vs_sparsity.png")}, '
          f'{osp.join(prune_dir, "cpd_kept_channels.png")}')
    summary = dict(rows=[dict(zip(['model', 'params', 'flops', 'top1',
                                   'onnx_median_ms', 'speedup'], r))
                         for r in rows], accuracy_vs_sparsity=points,
                   seconds=time.time() - t0)
    with open(osp.join(ROOT, wd, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'total time {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
