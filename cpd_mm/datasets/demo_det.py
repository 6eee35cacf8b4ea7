"""Generated object-detection demo set in COCO format (no download needed).

Each image shows 1-3 objects of K classes (the first K shapes of
:data:`.shapes.SHAPES`, with the class-correlated but jittered hue and
texture of the other demo sets) on a cluttered background, with random
strokes and smaller *distractors* drawn from the shapes that are not classes
(unlabelled, so the detector must learn the shape, not "any blob"). Objects
are placed with little overlap; a box is the tight box of the pixels where
the object is visible (coverage >= 0.5, after later objects are drawn), so
boxes are exact to the pixel.

Layout written under ``root`` (MMDetection's ``CocoDataset`` reads it)::

    train/<index>.jpg   val/<index>.jpg   classes.txt
    annotations/instances_train.json   annotations/instances_val.json

The json files follow the COCO detection format: ``images`` (``id``,
``file_name`` relative to the split folder, ``width``, ``height``),
``annotations`` (``id``, ``image_id``, ``category_id`` 1..K, ``bbox``
``[x, y, w, h]`` in pixels, ``area`` = visible pixel area, ``iscrowd`` 0)
and ``categories`` (``id``, ``name``).

As for the other demo sets, image ``i`` of a split is drawn from its own
generator seeded by (seed, split, index): the same seed gives byte-identical
files, and an image does not depend on how many are requested.
"""
import json
import os
import os.path as osp
from typing import List

import numpy as np
from PIL import Image

from .demo_data import (_NOISE, _SHAPE_NAMES, _TEXTURE_NAMES,
                        _check_args, _check_num_classes, _class_object,
                        _prepare, _rng, _write_classes)
from .shapes import background, draw_strokes, finish, render_object, \
    random_colour

__all__ = ['make_detection_set', 'det_class_names']

_MAX_OBJECTS = 3
_RADIUS = (0.12, 0.24)  # object half-size, fraction of the image side
_MIN_VISIBLE = 0.6  # a placement hiding more of an earlier object is redrawn
_PLACEMENT_TRIES = 30


def det_class_names(num_classes: int) -> List[str]:
    """Class names of the detection set: the first K shape names.

    K is at most 6, so that two shapes remain for the distractors.
    """
    _check_num_classes(num_classes, 1, len(_SHAPE_NAMES) - 2)
    return _SHAPE_NAMES[:num_classes]


def _distractor(rng, size, num_classes):
    """A small object of a non-class shape, any texture and colour."""
    others = _SHAPE_NAMES[num_classes:]
    return dict(
        shape=others[rng.integers(len(others))],
        texture=_TEXTURE_NAMES[rng.integers(len(_TEXTURE_NAMES))],
        colour=random_colour(rng), centre=tuple(rng.uniform(0, size, 2)),
        radius=rng.uniform(0.05, 0.09) * size,
        angle=rng.uniform(0, 2 * np.pi), tex_freq=rng.uniform(1.2, 2.0))


def _draw(img, obj, commit=True):
    """Draw ``obj`` into ``img`` (in place if ``commit``); return its
    coverage >= 0.5 as a full-size bool map.

    Only a window around the object is computed (every shape lies within
    1.2 radii of its centre, plus the anti-aliased edge), which gives the
    same pixels as drawing on the whole image, several times faster.
    """
    h, w = img.shape[:2]
    reach = 1.25 * obj['radius'] + 2
    cx, cy = obj['centre']
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
    mask = np.zeros((h, w), bool)
    if x0 >= x1 or y0 >= y1:
        return mask
    window = img[y0:y1, x0:x1]
    if not commit:
        window = window.copy()
    alpha = render_object(window, **dict(obj, centre=(cx - x0, cy - y0)))
    mask[y0:y1, x0:x1] = alpha >= 0.5
    return mask


def _det_image(seed, split, index, num_classes, size):
    """One image: (uint8 HxWx3, list of (class 0-based, x, y, w, h, area))."""
    rng = _rng(seed, split, index)
    img = background(rng, size, size)
    draw_strokes(img, rng, int(rng.integers(0, 3)), width=size / 32)
    for _ in range(int(rng.integers(0, 3))):
        _draw(img, _distractor(rng, size, num_classes))

    objects, area = [], []
    owner = np.full((size, size), -1, np.int64)
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        cls = int(rng.integers(num_classes))
        for _ in range(_PLACEMENT_TRIES):
            obj = _class_object(rng, cls, num_classes, size, _RADIUS)
            mask = _draw(img, obj, commit=False)
            # the new object is drawn on top: every earlier one must stay
            # mostly visible (an object that is not placed is left out)
            if mask.any() and all(
                    ((owner == i) & ~mask).sum() >= _MIN_VISIBLE * a
                    for i, a in enumerate(area)):
                _draw(img, obj)
                owner[mask] = len(objects)
                objects.append(cls)
                area.append(int(mask.sum()))
                break

    boxes = []
    for i, cls in enumerate(objects):
        ys, xs = np.nonzero(owner == i)
        x0, y0 = int(xs.min()), int(ys.min())
        boxes.append((cls, x0, y0, int(xs.max()) + 1 - x0,
                      int(ys.max()) + 1 - y0, int(xs.size)))
    return finish(img, rng, _NOISE), boxes


def make_detection_set(root: str, num_train: int = 1000, num_val: int = 200,
                       image_size: int = 96, seed: int = 0,
                       num_classes: int = 4,
                       overwrite: bool = False) -> List[str]:
    """Write the detection demo set to ``root`` in COCO format.

    Args:
        root: output folder; ``train/``, ``val/`` and ``annotations/`` are
            created in it.
        num_train, num_val: number of images per split.
        image_size: side of the square images in pixels (>= 32).
        seed: generator seed; the same seed gives byte-identical files.
        num_classes: 1..6 object classes, named by :func:`det_class_names`
            (COCO category ids 1..K in that order).
        overwrite: delete the folders of an earlier run first; otherwise an
            existing set raises ``FileExistsError``.

    Returns:
        The class names, in category-id order.
    """
    names = det_class_names(num_classes)
    _check_args(num_train, num_val, image_size, 32)
    _prepare(root, ['train', 'val', 'annotations'], overwrite)
    os.makedirs(osp.join(root, 'annotations'))
    categories = [dict(id=k + 1, name=n) for k, n in enumerate(names)]
    for split, n in (('train', num_train), ('val', num_val)):
        os.makedirs(osp.join(root, split))
        images, annotations = [], []
        for i in range(n):
            img, boxes = _det_image(seed, split, i, num_classes, image_size)
            name = f'{i:06d}.jpg'
            # fixed JPEG settings so the bytes are reproducible
            Image.fromarray(img).save(osp.join(root, split, name),
                                      quality=95, subsampling=0)
            images.append(dict(id=i, file_name=name, width=image_size,
                               height=image_size))
            for cls, x, y, w, h, area in boxes:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=i,
                    category_id=cls + 1, bbox=[x, y, w, h], area=area,
                    iscrowd=0))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'),
                  'w') as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=categories), f)
    _write_classes(root, names)
    return names
