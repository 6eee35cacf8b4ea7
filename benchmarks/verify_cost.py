"""What comb's self-verification costs, relative to the trace.

    OMP_NUM_THREADS=1 python benchmarks/verify_cost.py --runs 5

On ResNet-50 and MobileNetV2 (torchvision) and DeiT-S (mmpretrain) at
224x224, in this process, on one thread: the median time of
``comb_model(verify=False)`` (the trace) and of ``comb_model()`` (trace
plus verification: a copy with generic weights, then two complementary
plans, each a gated and a physically pruned forward). The budget is
``with verification / trace <= 3``. Also timed: the generic copy alone, as
verification makes it (weights that are already generic kept) and with
every weight drawn anew (what the tests and tools/check_pruning.py use).
Run it on a quiet machine: both numbers are a few hundred milliseconds.
``--json out.json`` writes the rows.
"""
import argparse
import json
import os.path as osp
import statistics
import time

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def models():
    import torchvision
    from mmengine.config import Config
    from mmengine.config.utils import _get_package_and_cfg_path
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import get_installed_path
    import cpd_mm  # noqa: F401

    def mm(name):
        pkg, rel = _get_package_and_cfg_path(name)
        cfg = Config.fromfile(osp.join(get_installed_path(pkg), '.mim',
                                       'configs', rel))
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model)
        model.init_weights()
        return model

    yield 'ResNet-50 (torchvision)', torchvision.models.resnet50()
    yield 'MobileNetV2 (torchvision)', torchvision.models.mobilenet_v2()
    yield 'DeiT-S (mmpretrain)', mm(
        'mmpretrain::deit/deit-small_4xb256_in1k.py')


def median_time(fn, runs):
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    from cpd_mm.comb import comb_model, generic_copy
    torch.set_num_threads(1)
    shape = (1, 3, args.size, args.size)
    rows = []
    for name, model in models():
        model.eval()
        comb_model(model, input_shape=shape)  # warm-up (allocator, caches)
        trace, _ = median_time(
            lambda: comb_model(model, input_shape=shape, verify=False),
            args.runs)
        full, comb = median_time(
            lambda: comb_model(model, input_shape=shape), args.runs)
        copy_s, _ = median_time(
            lambda: generic_copy(model, redraw_weights=False), args.runs)
        full_copy_s, _ = median_time(lambda: generic_copy(model), args.runs)
        v = comb.verification
        row = dict(model=name, input=args.size, trace_s=trace,
                   with_verification_s=full, factor=full / trace,
                   generic_copy_s=copy_s, full_redraw_s=full_copy_s,
                   checks=v.checks,
                   frozen=v.frozen, weights=v.weights)
        rows.append(row)
        print(f'{name:28s} trace {trace:.3f} s, with verification '
              f'{full:.3f} s ({full / trace:.2f}x; generic copy '
              f'{copy_s:.3f} s, every weight drawn {full_copy_s:.3f} s; '
              f'{v.checks} checks, {len(v.frozen)} frozen)',
              flush=True)
    out = dict(torch=torch.__version__, threads=1, runs=args.runs,
               rows=rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    main()
