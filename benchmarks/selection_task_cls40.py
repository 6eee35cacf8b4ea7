"""Task ``cls40`` of ``selection_grid.py``: the classifier of task ``cls``
on a harder set, :mod:`cpd_mm.datasets.fine_shapes` with five class
textures (8 shapes x {stripes, checker, dots, waves, solid} = 40 classes,
64x64; the distractors are drawn from the same textures), so that the
half-width ResNet-18 does not saturate it and pruning costs accuracy that
the selection decides. One baseline per seed (``per_seed_baseline``): a
cell's three seeds start from three independently trained models.

Data, augmentation, loss and metric are task ``cls``'s; only the class set
and the recipe differ.
"""
import selection_task_cls as _cls
from selection_task_cls import (augment, batches, evaluate,  # noqa: F401
                                example, forward, loss, normalise,
                                tp_ignored_layers)

TASK = 'cls40'
METRIC = 'top-1'
TITLE = 'fine_shapes (40 classes, 64x64)'
SHAPE = _cls.SHAPE
TEXTURES = ('stripes', 'checker', 'dots', 'waves', 'solid')
NUM_CLASSES = 8 * len(TEXTURES)
DEFAULTS = dict(width=32, num_train=9600, num_val=2400, base_epochs=48,
                base_lr=0.1, epochs=3, lr=0.02, batch=64, round_to=16,
                per_seed_baseline=True)


def load_data(cache_dir, num_train, num_val):
    return _cls.load_data(cache_dir, num_train, num_val, TEXTURES)


def build_model(width=32):
    return _cls.build_model(width, NUM_CLASSES)
