"""A harder generated detection set, for comparing channel selections.

``fine_det`` has ``len(DET_SHAPES) * len(FINE_TEXTURES)`` = 12 classes at
128x128 by default: a class is a (shape, texture) pair (disk, square,
triangle, star x stripes, checker, dots) and nothing else carries it. Each
image holds 2-5 small labelled objects (half-size 7-15% of the side, so
boxes of about 12-46 px at 128x128) on a cluttered background, with random
strokes and unlabelled *distractors*: objects of the other shapes (ring,
cross, bar, crescent) in any texture, and objects of the class shapes in the
textures no class has (solid, waves). Colour, size, rotation and texture
frequency are random, so the detector must find small objects and tell
their shape and texture apart under noise; unlike :mod:`.demo_det` (4
classes, colour helps, large objects) the distinctions are fine.

Objects are placed so that every earlier labelled object stays at least 60%
visible; a box is the tight box of the pixels where its object is visible
(coverage >= 0.5, after every later object and distractor is drawn), in
``(x1, y1, x2, y2)`` pixels, exact to the pixel.

Arrays, no files: :func:`make_fine_det` returns ``(N, 3, S, S) uint8``
images and the boxes of all images concatenated (``float32 (M, 4)``,
``int64 (M,)`` labels, ``int64 (N + 1,)`` offsets: image ``i`` owns rows
``offsets[i]:offsets[i + 1]``). Image ``i`` of a split is drawn from its own
generator seeded by ``(seed, split, i)``: the same arguments give
bit-identical arrays, and image ``i`` does not depend on ``num``.
"""
from typing import List, Tuple

import numpy as np

from .demo_det import _draw
from .fine_shapes import FINE_TEXTURES
from .shapes import SHAPES, background, draw_strokes, finish, random_colour

__all__ = ['DET_SHAPES', 'fine_det_class_names', 'make_fine_det']

#: shapes that carry a class; the others are left to the distractors
DET_SHAPES = ('disk', 'square', 'triangle', 'star')
_OTHER_SHAPES = tuple(s for s in SHAPES if s not in DET_SHAPES)
_OTHER_TEXTURES = ('solid', 'waves')
_SPLITS = {'train': 0, 'val': 1}
_NOISE = 0.06
_OBJECTS = (2, 5)  # labelled objects per image (inclusive)
_RADIUS = (0.07, 0.15)  # object half-size, fraction of the side
_DISTRACTORS = (1, 4)
_DISTRACTOR_RADIUS = (0.04, 0.1)
_MIN_VISIBLE = 0.6
_TRIES = 30


def fine_det_class_names() -> List[str]:
    """Class names in label order: ``<shape>_<texture>``."""
    return [f'{s}_{t}' for s in DET_SHAPES for t in FINE_TEXTURES]


def _object(rng, shape, texture, size, radius_range, margin=0.6):
    radius = rng.uniform(*radius_range) * size
    m = margin * radius
    return dict(shape=shape, texture=texture, colour=random_colour(rng),
                centre=tuple(rng.uniform(m, size - m, 2)), radius=radius,
                angle=rng.uniform(0, 2 * np.pi),
                tex_freq=rng.uniform(0.8, 1.4))


def _distractor(rng, size):
    """An unlabelled object: another shape in any texture, or a class
    shape in a texture no class has."""
    if rng.random() < 0.5:
        shape = _OTHER_SHAPES[rng.integers(len(_OTHER_SHAPES))]
        texture = (*FINE_TEXTURES, *_OTHER_TEXTURES)[rng.integers(5)]
    else:
        shape = DET_SHAPES[rng.integers(len(DET_SHAPES))]
        texture = _OTHER_TEXTURES[rng.integers(len(_OTHER_TEXTURES))]
    return _object(rng, shape, texture, size, _DISTRACTOR_RADIUS, 0.0)


def _visible_enough(owner, mask, area):
    return all(((owner == i) & ~mask).sum() >= _MIN_VISIBLE * a
               for i, a in enumerate(area))


def _image(seed: int, split: str, index: int, size: int):
    """One image: (uint8 HxWx3, float32 (k, 4) xyxy boxes, int64 (k,))."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    num_tex = len(FINE_TEXTURES)
    img = background(rng, size, size)
    draw_strokes(img, rng, int(rng.integers(0, 4)), width=size / 48)
    owner = np.full((size, size), -1, np.int64)
    labels, area = [], []
    # distractors are placed among the objects (some under, some over them)
    kinds = ['object'] * int(rng.integers(_OBJECTS[0], _OBJECTS[1] + 1)) + \
        ['distractor'] * int(rng.integers(_DISTRACTORS[0],
                                          _DISTRACTORS[1] + 1))
    for k in rng.permutation(len(kinds)):
        cls = int(rng.integers(len(DET_SHAPES) * num_tex))
        for _ in range(_TRIES):
            if kinds[k] == 'object':
                shape, tex = divmod(cls, num_tex)
                obj = _object(rng, DET_SHAPES[shape], FINE_TEXTURES[tex],
                              size, _RADIUS)
            else:
                obj = _distractor(rng, size)
            mask = _draw(img, obj, commit=False)
            if mask.any() and _visible_enough(owner, mask, area):
                _draw(img, obj)
                if kinds[k] == 'object':
                    owner[mask] = len(labels)
                    labels.append(cls)
                    area.append(int(mask.sum()))
                else:
                    owner[mask] = -1
                break
    boxes = []
    for i in range(len(labels)):
        ys, xs = np.nonzero(owner == i)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    return (finish(img, rng, _NOISE),
            np.asarray(boxes, np.float32).reshape(-1, 4),
            np.asarray(labels, np.int64))


def make_fine_det(split: str, num: int, seed: int = 0, size: int = 128
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``num`` images of ``split`` ('train' or 'val') as
    ``(uint8 (num, 3, size, size), float32 (M, 4) xyxy boxes,
    int64 (M,) labels, int64 (num + 1,) offsets)``."""
    if split not in _SPLITS:
        raise ValueError(f'split must be one of {sorted(_SPLITS)}, got '
                         f'{split!r}')
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f'num must be an int >= 1, got {num!r}')
    if not (isinstance(size, int) and size >= 64):
        raise ValueError(f'size must be an int >= 64, got {size!r}')
    images = np.empty((num, 3, size, size), np.uint8)
    boxes, labels, offsets = [], [], [0]
    for i in range(num):
        img, b, lab = _image(seed, split, i, size)
        images[i] = img.transpose(2, 0, 1)
        boxes.append(b)
        labels.append(lab)
        offsets.append(offsets[-1] + len(lab))
    return (images, np.concatenate(boxes), np.concatenate(labels),
            np.asarray(offsets, np.int64))
