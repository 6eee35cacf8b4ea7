"""Time to trace and group a model: cpd_mm's comb (with and without its
self-verification) vs Torch-Pruning.

    pip install -e .[benchmark]        # torch-pruning
    python benchmarks/comb_speed.py [--runs 5] [--json out.json]

All run in this process on the same model instances: cpd_mm's
``comb_model(verify=False)`` (the trace), ``comb_model()`` (trace plus
verification: two random plans, each a gated and a physically pruned
forward), and Torch-Pruning's ``DependencyGraph().build_dependency`` (plus
its group enumeration, the part that corresponds to cpd_mm's groups).
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
        t_cpd = median_time(lambda: comb_model(model, example_inputs=x,
                                               verify=False), args.runs)
        t_ver = median_time(lambda: comb_model(model, example_inputs=x),
                            args.runs)
        res = comb_model(model, example_inputs=x)
        row = dict(model=name, input=size, cpd_seconds=t_cpd,
                   cpd_verify_seconds=t_ver, verify_factor=t_ver / t_cpd,
                   verify_checks=res.verification.checks,
                   verify_frozen=res.verification.frozen,
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
    print(f'\n{"model":28s} {"comb s":>7s} {"+verify s":>9s} {"x":>5s} '
          f'{"TP s":>7s} {"comb/TP":>7s} {"groups cpd/TP":>14s}')
    for r in rows:
        tp_s = f'{r["tp_seconds"]:.3f}' if 'tp_seconds' in r else 'n/a'
        ratio = f'{r["ratio_cpd_over_tp"]:.2f}' if 'tp_seconds' in r else '-'
        print(f'{r["model"]:28s} {r["cpd_seconds"]:7.3f} '
              f'{r["cpd_verify_seconds"]:9.3f} {r["verify_factor"]:5.2f} '
              f'{tp_s:>7s} {ratio:>7s} '
              f'{r["cpd_groups"]:>6d}/{r.get("tp_groups", "-")}')
    with open(args.json, 'w') as f:
        json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                       runs=args.runs, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
