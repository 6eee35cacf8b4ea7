"""A harder generated classification set, for comparing channel selections.

``fine_shapes`` has ``len(SHAPES) * len(FINE_TEXTURES)`` = 24 classes at
64x64 by default: a class is a (shape, texture) pair, and nothing else
carries it. Colour, scale, rotation, texture frequency, background, clutter
strokes and distractors (smaller objects of any shape and texture, some drawn
over the main one) are random, so a classifier must tell e.g. a striped from
a checkered star by texture and a disk from a ring by shape, under noise.
Unlike :mod:`.demo_data` (6 classes, colour helps) the distinctions are fine
and the validation set is large (2400 images: one image is 0.042 points),
so that differences between channel selections exceed the evaluation noise.

Images are returned as arrays (no files): ``(N, 3, H, W) uint8`` and
``(N,) int64`` labels. Image ``i`` of a split is drawn from its own
generator seeded by ``(seed, split, i)``: the same arguments give
bit-identical arrays, and image ``i`` does not depend on ``num``.
"""
from typing import List, Tuple

import numpy as np

from .shapes import (SHAPES, TEXTURES, background, draw_strokes, finish,
                     random_colour, render_object)

__all__ = ['FINE_TEXTURES', 'fine_class_names', 'make_fine_shapes']

#: textures that carry the class (``solid`` and ``waves`` are left to the
#: distractors: a solid object has no texture to tell apart)
FINE_TEXTURES = ('stripes', 'checker', 'dots')
_SPLITS = {'train': 0, 'val': 1}
_NOISE = 0.08


def fine_class_names(textures: Tuple[str, ...] = FINE_TEXTURES
                     ) -> List[str]:
    """Class names in label order: ``<shape>_<texture>``."""
    return [f'{s}_{t}' for s in SHAPES for t in textures]


def _image(seed: int, split: str, index: int, size: int,
           textures: Tuple[str, ...]):
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    names = list(SHAPES)
    label = index % (len(names) * len(textures))  # balanced classes
    shape, texture = divmod(label, len(textures))
    img = background(rng, size, size)
    draw_strokes(img, rng, int(rng.integers(0, 3)), width=size / 24)
    for _ in range(int(rng.integers(0, 3))):  # under the main object
        render_object(img, names[rng.integers(len(names))],
                      list(TEXTURES)[rng.integers(len(TEXTURES))],
                      random_colour(rng), tuple(rng.uniform(0, size, 2)),
                      rng.uniform(0.08, 0.14) * size,
                      rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 2.0))
    radius = rng.uniform(0.2, 0.34) * size
    m = 0.6 * radius
    render_object(img, names[shape], textures[texture],
                  random_colour(rng), tuple(rng.uniform(m, size - m, 2)),
                  radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 2.0))
    if rng.random() < 0.5:  # one small distractor on top
        render_object(img, names[rng.integers(len(names))],
                      textures[rng.integers(len(textures))],
                      random_colour(rng), tuple(rng.uniform(0, size, 2)),
                      rng.uniform(0.06, 0.1) * size,
                      rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 2.0))
    return finish(img, rng, _NOISE), label


def make_fine_shapes(split: str, num: int, seed: int = 0, size: int = 64,
                     textures: Tuple[str, ...] = FINE_TEXTURES
                     ) -> Tuple[np.ndarray, np.ndarray]:
    """``num`` images of ``split`` ('train' or 'val') as
    ``(uint8 (num, 3, size, size), int64 (num,))``; a class is a (shape,
    texture) pair over ``textures`` (default 8 x 3 = 24 classes; the
    default's images do not change when others are asked for), balanced
    (image ``i`` has label ``i % num_classes``)."""
    if split not in _SPLITS:
        raise ValueError(f'split must be one of {sorted(_SPLITS)}, got '
                         f'{split!r}')
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f'num must be an int >= 1, got {num!r}')
    if not (isinstance(size, int) and size >= 32):
        raise ValueError(f'size must be an int >= 32, got {size!r}')
    textures = tuple(textures)
    unknown = [t for t in textures if t not in TEXTURES]
    if unknown or len(set(textures)) != len(textures) or not textures:
        raise ValueError(f'textures must be distinct names out of '
                         f'{sorted(TEXTURES)}, got {textures!r}')
    images = np.empty((num, 3, size, size), np.uint8)
    labels = np.empty(num, np.int64)
    for i in range(num):
        img, labels[i] = _image(seed, split, i, size, textures)
        images[i] = img.transpose(2, 0, 1)
    return images, labels
