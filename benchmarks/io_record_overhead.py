"""What recording module inputs/outputs (``CombResult.io_channels``) costs
the trace: time of ``comb_model(verify=False)`` with the recording as it is
and with it switched off (interleaved runs, same model instances), and the
memory the records keep (bytes of the distinct channel-id arrays).

    python benchmarks/io_record_overhead.py [--runs 7] [--json out.json]
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch


def models():
    import torchvision
    from mmengine.config import Config
    from mmengine.registry import DefaultScope, MODELS
    import cpd_mm  # noqa: F401
    yield 'ResNet-50 (torchvision)', torchvision.models.resnet50(), 224
    yield 'ViT-B/16 (torchvision)', torchvision.models.vit_b_16(), 224
    cfg = Config.fromfile('configs/demo/rtmdet_demo-det.py')
    with DefaultScope.overwrite_default_scope('mmdet'):
        yield 'RTMDet demo (mmdet)', MODELS.build(cfg.model), 96


def record_bytes(comb) -> int:
    arrays = {id(e[0]): e[0].nbytes for calls in comb._io.values()
              for call in calls for e in call if e is not None}
    return int(sum(arrays.values()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--runs', type=int, default=7)
    p.add_argument('--json', default=None)
    args = p.parse_args()
    from cpd_mm.comb import comb_model
    from cpd_mm.comb.tracer import CombTracer
    recording = CombTracer.record_io

    def off(self, name, kind, value, traced=True):
        self.io[(name, kind)].append([])
    rows = []
    for name, model, size in models():
        model.eval()
        x = torch.randn(1, 3, size, size)
        comb_model(model, example_inputs=x, verify=False)  # warm-up
        times = {'on': [], 'off': []}
        for run in range(args.runs):
            # alternate the order: the second of a pair runs warmer
            for mode in (('on', 'off'), ('off', 'on'))[run % 2]:
                CombTracer.record_io = recording if mode == 'on' else off
                t = time.perf_counter()
                comb = comb_model(model, example_inputs=x, verify=False)
                times[mode].append(time.perf_counter() - t)
                if mode == 'on':
                    kept = record_bytes(comb)
        CombTracer.record_io = recording
        on, off_ = (statistics.median(times[m]) for m in ('on', 'off'))
        rows.append(dict(model=name, input=size, trace_s=round(on, 4),
                         trace_without_io_s=round(off_, 4),
                         overhead=round(on / off_ - 1, 4),
                         io_record_bytes=kept))
        print(f'{name:28s} trace {on:.3f} s, without io records '
              f'{off_:.3f} s ({100 * (on / off_ - 1):+.1f}%), records '
              f'{kept / 1e6:.2f} MB')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(runs=args.runs, torch=torch.__version__,
                           numpy=np.__version__, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
