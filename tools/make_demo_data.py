"""Generate the demo data sets used by configs/demo (no download needed).

Examples::

    python tools/make_demo_data.py                 # all sets, default sizes
    python tools/make_demo_data.py cls --num-train 500 --out data/demo/cls
    python tools/make_demo_data.py seg --seed 1 --overwrite
    python tools/make_demo_data.py det             # COCO-format detection

The same seed always gives byte-identical files
(see cpd_mm.datasets.demo_data and cpd_mm.datasets.demo_det).
"""
import argparse
import os.path as osp
import sys
import time

from cpd_mm.datasets.demo_data import (make_classification_set,
                                       make_segmentation_set)
from cpd_mm.datasets.demo_det import make_detection_set

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# Defaults match configs/demo: data_root is data/demo/{cls,seg,det} in the
# repository.
DEFAULTS = dict(
    cls=dict(fn=make_classification_set, num_train=2000, num_val=500,
             image_size=32, num_classes=6),
    seg=dict(fn=make_segmentation_set, num_train=600, num_val=150,
             image_size=64, num_classes=5),
    det=dict(fn=make_detection_set, num_train=1000, num_val=200,
             image_size=96, num_classes=4))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('kind', nargs='?',
                        choices=['cls', 'seg', 'det', 'all'],
                        default='all', help='which set to write')
    parser.add_argument('--out', help='output folder (only with one kind; '
                        'default data/demo/<kind> in the repository)')
    parser.add_argument('--num-train', type=int, help='training images')
    parser.add_argument('--num-val', type=int, help='validation images')
    parser.add_argument('--image-size', type=int, help='image side (px)')
    parser.add_argument('--num-classes', type=int, help='number of classes')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing generated set')
    args = parser.parse_args(argv)
    if args.out and args.kind == 'all':
        parser.error('--out needs one kind: cls, seg or det')
    return args


def main(argv=None):
    args = parse_args(argv)
    kinds = list(DEFAULTS) if args.kind == 'all' else [args.kind]
    for kind in kinds:
        d = dict(DEFAULTS[kind])
        fn = d.pop('fn')
        for key in d:
            if getattr(args, key) is not None:
                d[key] = getattr(args, key)
        out = args.out or osp.join(ROOT, 'data', 'demo', kind)
        start = time.time()
        try:
            names = fn(out, seed=args.seed, overwrite=args.overwrite, **d)
        except (ValueError, FileExistsError) as e:
            sys.exit(f'error: {e}')
        print(f'{kind}: {d["num_train"]} train + {d["num_val"]} val images '
              f'({", ".join(names)}) in {out} [{time.time() - start:.1f} s]')


if __name__ == '__main__':
    main()
