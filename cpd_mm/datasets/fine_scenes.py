"""Generated segmentation scenes, for comparing channel selections.

``fine_scenes`` labels every pixel with one of ``NUM_CLASSES`` = 14 classes:

* 0: background, which includes *distractor* objects: shapes outside
  :data:`SCENE_SHAPES` in any texture, and the scene shapes in a texture
  outside :data:`FINE_TEXTURES` (solid or waves), plus a wide clutter
  stroke (5-7 px) now and then;
* 1..12: an object of one (shape, texture) pair of :data:`SCENE_SHAPES` x
  :data:`FINE_TEXTURES` (label ``1 + 3 * shape + texture``);
* 13: thin structure: 2-3 px wide strokes drawn over everything (labelled,
  not ignored). The demo PSPNet (output stride 8, logits resized
  bilinearly) hardly ever predicts them: IoU 0 at 1-2 px after a 12-epoch
  pilot, 0.7 at 2-3 px after the selection grid's 20-epoch baseline.

Colours, sizes, rotations, texture frequencies, background gradients and
blotches are random, so an object's class is carried by its shape and its
texture only (a striped square against a dotted one, a checkered disk
against a checkered star, a star against a cross of the same texture, which
is background). Every pixel is labelled: nothing is ignored.

Arrays, no files: images ``(N, 3, H, W) uint8`` and labels
``(N, H, W) uint8``. Scene ``i`` of a split is drawn from its own generator
seeded by ``(seed, split, i)``: the same arguments give bit-identical arrays,
and scene ``i`` does not depend on ``num``.
"""
from typing import List, Tuple

import numpy as np

from .fine_shapes import FINE_TEXTURES
from .shapes import (SHAPES, background, draw_strokes, finish, random_colour,
                     render_object)

__all__ = ['SCENE_SHAPES', 'NUM_CLASSES', 'THIN', 'scene_class_names',
           'make_fine_scenes']

#: shapes that carry a class (the other shapes of :data:`SHAPES` appear as
#: background distractors)
SCENE_SHAPES = ('disk', 'square', 'triangle', 'star')
_OTHER_SHAPES = tuple(s for s in SHAPES if s not in SCENE_SHAPES)
_OTHER_TEXTURES = ('solid', 'waves')
#: label of the thin strokes
THIN = 1 + len(SCENE_SHAPES) * len(FINE_TEXTURES)
NUM_CLASSES = THIN + 1
_SPLITS = {'train': 0, 'val': 1}
_NOISE = 0.08


def scene_class_names() -> List[str]:
    """Class names in label order: background, ``<shape>_<texture>``,
    thin."""
    return (['background'] +
            [f'{s}_{t}' for s in SCENE_SHAPES for t in FINE_TEXTURES] +
            ['thin'])


def _object(rng, shape, texture, size, radius):
    return dict(shape=shape, texture=texture, colour=random_colour(rng),
                centre=tuple(rng.uniform(0.1 * size, 0.9 * size, 2)),
                radius=radius, angle=rng.uniform(0, 2 * np.pi),
                tex_freq=rng.uniform(0.7, 1.4))


def _scene(seed: int, split: str, index: int, size: int):
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    img = background(rng, size, size)
    label = np.zeros((size, size), np.uint8)
    # background clutter: a wide stroke (5-7 px), distractor objects
    draw_strokes(img, rng, int(rng.random() < 0.5),
                 width=rng.uniform(5.0, 7.0))
    for _ in range(int(rng.integers(0, 3))):
        if rng.random() < 0.5:  # a shape that is never a class
            shape = _OTHER_SHAPES[rng.integers(len(_OTHER_SHAPES))]
            texture = list(FINE_TEXTURES + _OTHER_TEXTURES)[
                rng.integers(len(FINE_TEXTURES) + len(_OTHER_TEXTURES))]
        else:  # a class shape in a texture that is never a class
            shape = SCENE_SHAPES[rng.integers(len(SCENE_SHAPES))]
            texture = _OTHER_TEXTURES[rng.integers(len(_OTHER_TEXTURES))]
        alpha = render_object(img, **_object(
            rng, shape, texture, size, rng.uniform(0.1, 0.2) * size))
        label[alpha >= 0.5] = 0
    # 2-4 labelled objects, later ones over earlier ones
    for _ in range(int(rng.integers(2, 5))):
        s = int(rng.integers(len(SCENE_SHAPES)))
        t = int(rng.integers(len(FINE_TEXTURES)))
        alpha = render_object(img, **_object(
            rng, SCENE_SHAPES[s], FINE_TEXTURES[t], size,
            rng.uniform(0.16, 0.3) * size))
        label[alpha >= 0.5] = 1 + s * len(FINE_TEXTURES) + t
    # thin structure on top: 1-3 strokes of 2-3 px in 90% of the scenes
    n = int(rng.integers(1, 4)) if rng.random() < 0.9 else 0
    for _ in range(n):
        cover = draw_strokes(img, rng, 1, width=rng.uniform(2.0, 3.0))
        label[cover >= 0.5] = THIN
    return finish(img, rng, _NOISE), label


def make_fine_scenes(split: str, num: int, seed: int = 0,
                     size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """``num`` scenes of ``split`` ('train' or 'val') as
    ``(uint8 (num, 3, size, size), uint8 (num, size, size))``."""
    if split not in _SPLITS:
        raise ValueError(f'split must be one of {sorted(_SPLITS)}, got '
                         f'{split!r}')
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f'num must be an int >= 1, got {num!r}')
    if not (isinstance(size, int) and size >= 32):
        raise ValueError(f'size must be an int >= 32, got {size!r}')
    images = np.empty((num, 3, size, size), np.uint8)
    labels = np.empty((num, size, size), np.uint8)
    for i in range(num):
        img, labels[i] = _scene(seed, split, i, size)
        images[i] = img.transpose(2, 0, 1)
    return images, labels
