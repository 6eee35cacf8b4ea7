"""The main job on the embedded default: Comb, Prune, Distill end to end.

On generated data and this CPU:
  1. write the demo classification set (if missing);
  2. train the baseline classifier;
  3. fine-tune it unpruned with the budget the pruned model gets (the fair
     reference: what the extra training alone gives);
  4. prune the baseline to half its measured latency (a latency table
     measured on onnxruntime, cost-aware selection, Hessian importance, KL
     distillation from the reference) during the same fine-tuning budget;
  5. evaluate all three with the *original* config, export baseline and
     pruned model to ONNX, verify them, and time them interleaved
     ``--repeats`` times (the median speed-up is reported);
  6. deploy the pruned model in INT8: quantize it (calibrated on ``--calib``
     train images), verify it against FP32, score the INT8 graph on the val
     set with onnxruntime and time it against the FP32 baseline, again
     ``--repeats`` times;
  7. print one table, write work_dirs/demo/summary.json and a plot of
     accuracy against measured latency.

    python tools/run_demo.py [--work-dir work_dirs/demo] [--runs 1000]
        [--repeats 3] [--threads 1] [--calib 256] [--skip-baseline]

Every step runs the project's own tools (train.py, test.py, export_onnx.py)
as a subprocess, so their logs show as they go.
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


def evaluate(ckpt, work_dir):
    """top-1 of a checkpoint, or of an exported graph (``.onnx``) under
    onnxruntime."""
    out = run([sys.executable, 'tools/test.py', BASE_CFG, ckpt, '--work-dir',
               work_dir], capture=True)
    found = re.findall(r'accuracy/top1: ([0-9.]+)', out)
    if not found:
        raise RuntimeError(f'no accuracy in the output of test.py for {ckpt}')
    return float(found[-1])


def plot(rows, path):
    """Top-1 against measured latency; the reference marked. Returns the
    legend's labels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    style = {'baseline': ('s', '#7f7f7f'), 'reference': ('*', '#d62728'),
             'cpd': ('o', '#1f77b4'), 'cpd_int8': ('D', '#2ca02c')}
    for r in rows:
        marker, colour = style[r['name']]
        ax.scatter(r['onnx_median_ms'], r['top1'], marker=marker, s=110,
                   color=colour, label=r['model'], zorder=3)
    ref = [r for r in rows if r['name'] == 'reference'][0]
    ax.axhline(ref['top1'], color='#d62728', lw=0.8, ls='--', zorder=1)
    ax.axhline(ref['top1'] - 1, color='#d62728', lw=0.6, ls=':', zorder=1,
               label='reference - 1 point')
    ax.set_xlabel('onnxruntime median latency (ms, CPU, 1 thread)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title('CPD on the demo classifier')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    return labels


def load_config(cfg_path):
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, cfg_path))


def cpd_label(cfg):
    """'CPD: latency 50%, hessian + KL', read from the prune config."""
    hook = [h for h in cfg.custom_hooks if h['type'] == 'CPDPruningHook'][0]
    distill = cfg.model.get('distill', 'none')
    return (f"CPD: {hook['target']} {hook['target_sparsity']:.0%}, "
            f"{hook.get('importance', 'hessian')}"
            + ('' if distill == 'none' else f' + {distill.upper()}'))


def median_compare(timings):
    """The compare record whose speed-up is the median of ``timings``."""
    return sorted(timings, key=lambda c: c['speedup_median'])[
        len(timings) // 2]


def int8_row(label, tune_epochs, cmp, top1):
    """The table row of the INT8 CPD model: its accuracy under onnxruntime
    and its speed-up against the FP32 baseline (``cmp``: the median
    comparison of export_onnx.py --int8 --compare-to BASELINE)."""
    q = cmp['pruned']
    return dict(name='cpd_int8', model=f'{label} + INT8, +{tune_epochs} '
                'epochs', params=q['params'], flops=q['flops'], top1=top1,
                onnx_median_ms=q['benchmark']['median_ms'],
                speedup=cmp['speedup_median'], precision='int8')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work-dir', default='work_dirs/demo')
    p.add_argument('--runs', type=int, default=1000,
                   help='timed onnxruntime runs per model (default 1000)')
    p.add_argument('--threads', type=int, default=1,
                   help='onnxruntime intra-op threads (default 1: a 1 ms '
                   'model gains nothing from more, its timing gets noisier)')
    p.add_argument('--repeats', type=int, default=3,
                   help='interleaved timings of baseline and pruned model; '
                   'the median speed-up is reported (default 3)')
    p.add_argument('--calib', type=int, default=256,
                   help='calibration images of the INT8 model (default 256)')
    p.add_argument('--skip-baseline', action='store_true',
                   help='reuse an existing baseline checkpoint')
    args = p.parse_args()
    if args.runs < 1 or args.repeats < 1 or args.calib < 1:
        p.error(f'--runs, --repeats and --calib must be at least 1, got '
                f'{args.runs}, {args.repeats} and {args.calib}')
    t0 = time.time()
    wd = args.work_dir
    dirs = {k: osp.join(wd, k) for k in ('baseline', 'reference', 'cpd')}
    os.makedirs(osp.join(ROOT, wd), exist_ok=True)
    py = sys.executable

    if not osp.isdir(osp.join(ROOT, 'data/demo/cls/train')):
        run([py, 'tools/make_demo_data.py', 'cls'])
    prune_cfg = load_config(PRUNE_CFG)
    base_epochs = load_config(BASE_CFG).train_cfg.max_epochs
    tune_epochs = prune_cfg.train_cfg.max_epochs
    base_ckpt = osp.join(dirs['baseline'], f'epoch_{base_epochs}.pth')
    if not (args.skip_baseline and osp.exists(osp.join(ROOT, base_ckpt))):
        run([py, 'tools/train.py', BASE_CFG, '--work-dir', dirs['baseline']])
    # the reference: the prune config's schedule without hook or teacher
    t = time.time()
    run([py, 'tools/train.py', PRUNE_CFG, '--work-dir', dirs['reference'],
         '--cfg-options', f'load_from={base_ckpt}', 'custom_hooks=[]',
         'model.distill=none'])
    wall = dict(reference=time.time() - t)
    ref_ckpt = osp.join(dirs['reference'], f'epoch_{tune_epochs}.pth')
    # the teacher is the converged reference (docs/choosing_sparsity.md)
    teacher = osp.join(ROOT, wd, 'teacher_config.py')
    with open(teacher, 'w') as f:
        f.write(f"_base_ = ['{osp.join(ROOT, PRUNE_CFG)}']\n"
                f"model = dict(teacher=dict(_delete_=True, config="
                f"'{BASE_CFG}', checkpoint='{ref_ckpt}'))\n")
    t = time.time()
    run([py, 'tools/train.py', teacher, '--work-dir', dirs['cpd'],
         '--cfg-options', f'load_from={base_ckpt}'])
    wall['cpd'] = time.time() - t
    final = osp.join(dirs['cpd'], 'pruned_final.pth')

    acc = {k: evaluate(ck, osp.join(wd, 'test_' + k)) for k, ck in
           (('baseline', base_ckpt), ('reference', ref_ckpt),
            ('cpd', final))}
    # one interleaved timing of a 0.2 ms model can land on a slower core or
    # meet a busy neighbour; time it --repeats times, report the median
    timings = []
    for i in range(args.repeats):
        report = osp.join(wd, f'onnx_compare_{i}.json')
        run([py, 'tools/export_onnx.py', BASE_CFG, final, '--out',
             osp.join(wd, 'pruned.onnx'), '--benchmark', '--runs',
             str(args.runs), '--threads', str(args.threads), '--compare-to',
             base_ckpt, '--json', report, '--force']
            + (['--verify'] if i == 0 else []))
        with open(osp.join(ROOT, report)) as f:
            timings.append(json.load(f)['compare'])
    cmp = median_compare(timings)
    # the pruned model deployed in INT8, timed against the FP32 baseline
    int8_path, int8_timings = osp.join(wd, 'pruned_int8.onnx'), []
    for i in range(args.repeats):
        report = osp.join(wd, f'onnx_int8_compare_{i}.json')
        run([py, 'tools/export_onnx.py', BASE_CFG, final, '--int8',
             '--calib', str(args.calib), '--out', int8_path, '--benchmark',
             '--runs', str(args.runs), '--threads', str(args.threads),
             '--compare-to', base_ckpt, '--json', report, '--force']
            + (['--verify'] if i == 0 else []))
        with open(osp.join(ROOT, report)) as f:
            int8_timings.append(json.load(f)['compare'])
    acc['cpd_int8'] = evaluate(int8_path, osp.join(wd, 'test_cpd_int8'))
    o, q = cmp['original'], cmp['pruned']
    o_ms, q_ms = o['benchmark']['median_ms'], q['benchmark']['median_ms']
    rows = [
        dict(name='baseline', model=f'baseline ({base_epochs} epochs)',
             params=o['params'],
             flops=o['flops'], top1=acc['baseline'], onnx_median_ms=o_ms,
             speedup=1.0),
        dict(name='reference',
             model=f'reference: unpruned, +{tune_epochs} epochs',
             params=o['params'],
             flops=o['flops'], top1=acc['reference'], onnx_median_ms=o_ms,
             speedup=1.0),
        dict(name='cpd',
             model=f'{cpd_label(prune_cfg)}, +{tune_epochs} epochs',
             params=q['params'], flops=q['flops'], top1=acc['cpd'],
             onnx_median_ms=q_ms, speedup=cmp['speedup_median']),
        int8_row(cpd_label(prune_cfg), tune_epochs,
                 median_compare(int8_timings), acc['cpd_int8']),
    ]
    print('\n' + '=' * 92)
    print(f'{"model":44s} {"params":>9s} {"FLOPs":>9s} {"top-1 %":>8s} '
          f'{"ONNX ms":>8s} {"speed-up":>9s}')
    for r in rows:
        print(f'{r["model"]:44s} {r["params"] / 1e6:8.3f}M '
              f'{r["flops"] / 1e6:8.2f}M {r["top1"]:8.2f} '
              f'{r["onnx_median_ms"]:8.3f} {r["speedup"]:8.2f}x')
    print('=' * 92)
    gap = acc['cpd'] - acc['reference']
    spread = ', '.join(f'{c["speedup_median"]:.2f}x' for c in timings)
    print(f'CPD vs reference: {gap:+.2f} points of top-1 at '
          f'{cmp["speedup_median"]:.2f}x the speed (median of {len(timings)}'
          f' timings: {spread})')
    int8_gap = acc['cpd_int8'] - acc['cpd']
    print(f'CPD in INT8: {int8_gap:+.2f} points of top-1 against FP32 at '
          f'{rows[-1]["speedup"]:.2f}x the FP32 baseline\'s speed')
    print(f'CPD run (prune while distilling, the student shrinking as it '
          f'is pruned): {wall["cpd"]:.0f} s of wall time, '
          f'{wall["cpd"] / wall["reference"]:.2f}x the unpruned same-budget '
          f'fine-tune ({wall["reference"]:.0f} s; no teacher there)')
    fig = osp.join(wd, 'accuracy_vs_latency.png')
    plot(rows, osp.join(ROOT, fig))
    print(f'plots: {fig}, {osp.join(dirs["cpd"], "cpd_kept_channels.png")}')
    summary = dict(rows=rows, cpd_minus_reference=gap,
                   int8_minus_fp32=int8_gap,
                   speedup_repeats=[c['speedup_median'] for c in timings],
                   int8_speedup_repeats=[c['speedup_median']
                                         for c in int8_timings],
                   train_seconds=wall,
                   seconds=time.time() - t0)
    with open(osp.join(ROOT, wd, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'total time {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
