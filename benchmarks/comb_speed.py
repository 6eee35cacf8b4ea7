"""Time to trace and group a model: cpd_mm's comb vs Torch-Pruning.

    pip install -e .[benchmark]        # torch-pruning
    python benchmarks/comb_speed.py [--runs 5] [--json out.json]

Both run in this process on the same model instances: cpd_mm's
``comb_model`` and Torch-Pruning's ``DependencyGraph().build_dependency``
(plus its group enumeration, the part that corresponds to cpd_mm's groups).
Prints a table of medians and writes JSON.
"""
import argparse
import json
import statistics
import time

import torch


def models():
    import torchvision
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    import cpd_mm  # noqa: F401
    import os.path as osp
    from mmengine.config.utils import _get_package_and_cfg_path
    from mmengine.utils import get_installed_path

    def mm(name):
        pkg, rel = _get_package_and_cfg_path(name)
        cfg = Config.fromfile(osp.join(get_installed_path(pkg), '.mim',
                                       'configs', rel))
        init_default_scope(cfg.default_scope)
        return MODELS.build(cfg.model)

    yield 'ResNet-50 (torchvision)', torchvision.models.resnet50(), 224
    yield 'MobileNetV2 (torchvision)', torchvision.models.mobilenet_v2(), 224
    yield 'DeiT-S (mmpretrain)', mm(
        'mmpretrain::deit/deit-small_4xb256_in1k.py'), 224


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--json', default='benchmarks/comb_speed.json')
    args = p.parse_args()
    from cpd_mm.comb import comb_model
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
        print('torch-pruning is not installed: pip install -e .[benchmark]')
    rows = []
    for name, model, size in models():
        model.eval()
        x = torch.randn(1, 3, size, size)
        if hasattr(model, 'extract_feat'):
            fwd = (lambda m, inp: m(inp, mode='tensor'))
        else:
            fwd = None
        comb_model(model, example_inputs=x)  # warm-up (imports, caches)
        t_cpd = median_time(lambda: comb_model(model, example_inputs=x),
                            args.runs)
        res = comb_model(model, example_inputs=x)
        row = dict(model=name, input=size, cpd_seconds=t_cpd,
                   cpd_groups=len(res.groups),
                   cpd_prunable=len(res.prunable_groups))
        if tp is not None:
            def build():
                dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=x,
                    forward_fn=(lambda m, inp: fwd(m, inp)) if fwd else None)
                return list(dg.get_all_groups())
            try:
                build()
                row['tp_seconds'] = median_time(build, args.runs)
                row['tp_groups'] = len(build())
                row['ratio_cpd_over_tp'] = t_cpd / row['tp_seconds']
            except Exception as e:  # report, do not hide
                row['tp_error'] = repr(e)[:200]
        rows.append(row)
        print(row, flush=True)
    print(f'\n{"model":28s} {"cpd_mm s":>9s} {"TP s":>9s} {"cpd/TP":>7s} '
          f'{"groups cpd/TP":>14s}')
    for r in rows:
        tp_s = f'{r["tp_seconds"]:.3f}' if 'tp_seconds' in r else 'n/a'
        ratio = f'{r["ratio_cpd_over_tp"]:.2f}' if 'tp_seconds' in r else '-'
        print(f'{r["model"]:28s} {r["cpd_seconds"]:9.3f} {tp_s:>9s} '
              f'{ratio:>7s} {r["cpd_groups"]:>6d}/{r.get("tp_groups", "-")}')
    with open(args.json, 'w') as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                       runs=args.runs, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
