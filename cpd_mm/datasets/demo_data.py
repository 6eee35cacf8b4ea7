"""Generated demo data sets, for CPU-sized training without downloads.

Two data sets of procedurally drawn objects (see :mod:`.shapes`). An object
class is a (shape, texture, hue) triple; the cues overlap on purpose, so that
a small CNN learns the task well above chance but not perfectly:

* hues are jittered into the neighbouring classes' hues, and in a fraction of
  the images the colour or the texture of the object is random;
* backgrounds are random gradients with blotches, random strokes cross the
  image, smaller *distractor* objects of any shape are added, and all images
  get brightness/contrast changes and pixel noise.

Layouts written under ``root`` (``classes.txt`` lists the class names):

* classification, MMPretrain ``CustomDataset`` folder layout::

      train/<class>/<index>.png     val/<class>/<index>.png

* segmentation, MMSegmentation ADE20K layout::

      images/training/<index>.jpg       annotations/training/<index>.png
      images/validation/<index>.jpg     annotations/validation/<index>.png

  Label 0 means "unlabelled" (clutter strokes and distractors; it is ignored
  with ``reduce_zero_label=True`` as in ADE20K), 1 is the background and
  2..K are object classes.

Every image is drawn from its own generator seeded by (seed, split, index):
the same seed gives byte-identical files, and image ``i`` does not depend on
how many images are requested.
"""
import os
import os.path as osp
import shutil
from typing import List

import numpy as np
from PIL import Image

from .shapes import (SHAPES, TEXTURES, background, draw_strokes, finish,
                     random_colour, render_object)

__all__ = [
    'make_classification_set', 'make_segmentation_set', 'cls_class_names',
    'seg_class_names'
]

_SHAPE_NAMES = list(SHAPES)
_TEXTURE_NAMES = list(TEXTURES)
_SPLIT_IDS = {'train': 0, 'val': 1}
# Probability that an object's colour (texture) ignores its class, so colour
# (texture) alone cannot give a perfect classifier.
_P_RANDOM_COLOUR = 0.25
_P_RANDOM_TEXTURE = 0.25
_HUE_JITTER = 0.6  # in units of the hue spacing between classes
_NOISE = 0.06  # std of Gaussian pixel noise, image range [0, 1]
_PNG_LEVEL = 6  # fixed so that output bytes do not depend on PIL defaults


def cls_class_names(num_classes: int) -> List[str]:
    """Class names of the classification set: the first K shape names."""
    _check_num_classes(num_classes, 2, len(_SHAPE_NAMES))
    return _SHAPE_NAMES[:num_classes]


def seg_class_names(num_classes: int) -> List[str]:
    """Class names of the segmentation set (labels 1..K, 0 unlabelled)."""
    _check_num_classes(num_classes, 2, len(_SHAPE_NAMES) + 1)
    return ['background'] + _SHAPE_NAMES[:num_classes - 1]


def _check_num_classes(k: int, lo: int, hi: int) -> None:
    if not lo <= k <= hi:
        raise ValueError(f'num_classes must be in [{lo}, {hi}], but got {k}')


def _check_args(num_train, num_val, image_size, min_size):
    for name, n in (('num_train', num_train), ('num_val', num_val)):
        if n < 0:
            raise ValueError(f'{name} must be >= 0, but got {n}')
    if image_size < min_size:
        raise ValueError(
            f'image_size must be >= {min_size}, but got {image_size}')


def _prepare(root: str, subdirs: List[str], overwrite: bool) -> None:
    """Create ``root``; refuse to mix with an earlier generated set."""
    existing = [d for d in subdirs if osp.exists(osp.join(root, d))]
    if existing and not overwrite:
        raise FileExistsError(
            f'{root} already holds {existing}; pass overwrite=True '
            '(--overwrite) to regenerate it')
    for d in existing:  # only the folders this module writes
        shutil.rmtree(osp.join(root, d))
    os.makedirs(root, exist_ok=True)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _class_object(rng, cls: int, num_classes: int, size: int,
                  radius_range) -> dict:
    """Drawing arguments of one object of class ``cls`` (0-based)."""
    hue = cls / num_classes
    colour = (random_colour(rng) if rng.random() < _P_RANDOM_COLOUR else
              random_colour(rng, hue, _HUE_JITTER / num_classes))
    texture = (_TEXTURE_NAMES[rng.integers(len(_TEXTURE_NAMES))]
               if rng.random() < _P_RANDOM_TEXTURE else
               _TEXTURE_NAMES[cls % len(_TEXTURE_NAMES)])
    radius = rng.uniform(*radius_range) * size
    margin = 0.6 * radius
    return dict(
        shape=_SHAPE_NAMES[cls], texture=texture, colour=colour,
        centre=tuple(rng.uniform(margin, size - margin, 2)), radius=radius,
        angle=rng.uniform(0, 2 * np.pi), tex_freq=rng.uniform(1.2, 2.0))


def _distractor(rng, size: int, radius_range) -> dict:
    """A small object of any shape, texture and colour."""
    radius = rng.uniform(*radius_range) * size
    return dict(
        shape=_SHAPE_NAMES[rng.integers(len(_SHAPE_NAMES))],
        texture=_TEXTURE_NAMES[rng.integers(len(_TEXTURE_NAMES))],
        colour=random_colour(rng), centre=tuple(rng.uniform(0, size, 2)),
        radius=radius, angle=rng.uniform(0, 2 * np.pi),
        tex_freq=rng.uniform(1.2, 2.0))


def _cls_image(seed, split, index, num_classes, size):
    """One classification image: (uint8 HxWx3, class index)."""
    rng = _rng(seed, split, index)
    label = index % num_classes  # balanced classes
    img = background(rng, size, size)
    draw_strokes(img, rng, int(rng.integers(0, 3)), width=size / 16)
    main = _class_object(rng, label, num_classes, size, (0.22, 0.36))
    # Distractors are smaller than the main object; some are drawn on top.
    for _ in range(int(rng.integers(0, 2))):
        render_object(img, **_distractor(rng, size, (0.08, 0.14)))
    render_object(img, **main)
    for _ in range(int(rng.integers(0, 2))):
        render_object(img, **_distractor(rng, size, (0.06, 0.1)))
    return finish(img, rng, _NOISE), label


def _seg_image(seed, split, index, num_classes, size):
    """One segmentation image: (uint8 HxWx3, uint8 HxW label map)."""
    rng = _rng(seed, split, index)
    img = background(rng, size, size)
    label = np.ones((size, size), np.uint8)  # 1 = background
    for _ in range(int(rng.integers(2, 5))):
        cls = int(rng.integers(num_classes - 1))
        alpha = render_object(img, **_class_object(rng, cls, num_classes - 1,
                                                    size, (0.12, 0.25)))
        label[alpha >= 0.5] = cls + 2
    for _ in range(int(rng.integers(0, 3))):
        alpha = render_object(img, **_distractor(rng, size, (0.04, 0.08)))
        label[alpha >= 0.5] = 0
    cover = draw_strokes(img, rng, int(rng.integers(0, 3)), width=size / 32)
    label[cover >= 0.5] = 0
    return finish(img, rng, _NOISE), label


def _write_classes(root: str, names: List[str]) -> None:
    with open(osp.join(root, 'classes.txt'), 'w') as f:
        f.write('\n'.join(names) + '\n')


def make_classification_set(root: str, num_train: int = 2000,
                            num_val: int = 500, image_size: int = 32,
                            seed: int = 0, num_classes: int = 6,
                            overwrite: bool = False) -> List[str]:
    """Write the classification demo set to ``root``.

    Args:
        root: output folder; ``train/`` and ``val/`` are created in it.
        num_train, num_val: number of images per split (classes balanced).
        image_size: side of the square images in pixels (>= 16).
        seed: generator seed; the same seed gives byte-identical files.
        num_classes: 2..8 classes, named by :func:`cls_class_names`.
        overwrite: delete ``train/``/``val/`` of an earlier run first;
            otherwise an existing set raises ``FileExistsError``.

    Returns:
        The class names, in label order.
    """
    names = cls_class_names(num_classes)
    _check_args(num_train, num_val, image_size, 16)
    _prepare(root, ['train', 'val'], overwrite)
    for split, n in (('train', num_train), ('val', num_val)):
        for name in names:
            os.makedirs(osp.join(root, split, name))
        for i in range(n):
            img, label = _cls_image(seed, split, i, num_classes, image_size)
            Image.fromarray(img).save(
                osp.join(root, split, names[label], f'{i:06d}.png'),
                compress_level=_PNG_LEVEL)
    _write_classes(root, names)
    return names


def make_segmentation_set(root: str, num_train: int = 600,
                          num_val: int = 150, image_size: int = 64,
                          seed: int = 0, num_classes: int = 5,
                          overwrite: bool = False) -> List[str]:
    """Write the segmentation demo set to ``root`` in the ADE20K layout.

    Args:
        root: output folder; ``images/`` and ``annotations/`` are created.
        num_train, num_val: number of images in ``training``/``validation``.
        image_size: side of the square images in pixels (>= 32).
        seed: generator seed; the same seed gives byte-identical files.
        num_classes: number of labelled classes K (2..9): label 1 is the
            background, 2..K are objects, 0 is unlabelled (ignored).
        overwrite: as in :func:`make_classification_set`.

    Returns:
        The names of classes 1..K, in label order.
    """
    names = seg_class_names(num_classes)
    _check_args(num_train, num_val, image_size, 32)
    _prepare(root, ['images', 'annotations'], overwrite)
    for split, n in (('training', num_train), ('validation', num_val)):
        img_dir = osp.join(root, 'images', split)
        ann_dir = osp.join(root, 'annotations', split)
        os.makedirs(img_dir)
        os.makedirs(ann_dir)
        key = 'train' if split == 'training' else 'val'
        for i in range(n):
            img, label = _seg_image(seed, key, i, num_classes, image_size)
            # JPEG as in ADE20K; fixed quality and no subsampling choice left
            # to PIL defaults, so the bytes are reproducible.
            Image.fromarray(img).save(
                osp.join(img_dir, f'{i:06d}.jpg'), quality=95, subsampling=0)
            Image.fromarray(label).save(
                osp.join(ann_dir, f'{i:06d}.png'), compress_level=_PNG_LEVEL)
    _write_classes(root, names)
    return names
