"""The generated demo data sets: determinism, layout, labels, difficulty."""
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from cpd_mm.datasets.demo_data import (cls_class_names,
                                       make_classification_set,
                                       make_segmentation_set)
from cpd_mm.datasets.demo_det import det_class_names, make_detection_set


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = osp.join(d, f)
            out[osp.relpath(p, root)] = open(p, 'rb').read()
    return out


@pytest.mark.parametrize('make', [make_classification_set,
                                  make_segmentation_set, make_detection_set])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, make):
    kw = dict(num_train=10, num_val=5, image_size=32)
    make(str(tmp_path / 'a'), seed=3, **kw)
    make(str(tmp_path / 'b'), seed=3, **kw)
    make(str(tmp_path / 'c'), seed=4, **kw)
    a, b, c = (_tree(tmp_path / n) for n in 'abc')
    assert len(a) > 15 and a == b
    images = [k for k in a if k.endswith(('.jpg', '.png'))]
    assert sum(a[k] != c.get(k) for k in images) >= len(images) - 1


@pytest.mark.parametrize('make', [make_segmentation_set,
                                  make_detection_set])
def test_images_do_not_depend_on_set_size(tmp_path, make):
    make(str(tmp_path / 'small'), 3, 2, 32, seed=1)
    make(str(tmp_path / 'large'), 6, 4, 32, seed=1)
    small, large = _tree(tmp_path / 'small'), _tree(tmp_path / 'large')
    for k in small:
        if k.endswith(('.jpg', '.png')):
            assert small[k] == large[k], k


def test_classification_layout(tmp_path):
    root = str(tmp_path)
    names = make_classification_set(root, num_train=24, num_val=12,
                                    image_size=32, seed=0, num_classes=6)
    assert names == cls_class_names(6)
    assert open(osp.join(root, 'classes.txt')).read().split() == names
    for split, n in (('train', 24), ('val', 12)):
        # CustomDataset sorts the folder names into its classes.
        assert sorted(os.listdir(osp.join(root, split))) == sorted(names)
        for name in names:
            files = os.listdir(osp.join(root, split, name))
            assert len(files) == n // 6  # balanced
            img = Image.open(osp.join(root, split, name, files[0]))
            assert img.format == 'PNG' and img.mode == 'RGB'
            assert img.size == (32, 32)


def test_segmentation_layout_and_labels(tmp_path):
    root = str(tmp_path)
    names = make_segmentation_set(root, num_train=12, num_val=4,
                                  image_size=48, seed=0, num_classes=5)
    assert names[0] == 'background' and len(names) == 5
    seen = set()
    for split, n in (('training', 12), ('validation', 4)):
        imgs = sorted(os.listdir(osp.join(root, 'images', split)))
        anns = sorted(os.listdir(osp.join(root, 'annotations', split)))
        assert len(imgs) == n and all(f.endswith('.jpg') for f in imgs)
        assert [f[:-4] for f in imgs] == [f[:-4] for f in anns]
        for f in anns:
            img = Image.open(osp.join(root, 'images', split, f[:-4] + '.jpg'))
            ann = Image.open(osp.join(root, 'annotations', split, f))
            assert img.mode == 'RGB' and ann.mode == 'L'
            assert img.size == ann.size == (48, 48)
            label = np.asarray(ann)
            assert label.max() <= 5
            assert (label == 1).mean() > 0.3  # mostly background
            seen |= set(np.unique(label).tolist())
    # 0 (unlabelled clutter), background and every object class occur.
    assert seen == set(range(6))


def test_detection_layout_and_boxes(tmp_path):
    root = str(tmp_path)
    names = make_detection_set(root, num_train=40, num_val=8, image_size=64,
                               seed=0, num_classes=4)
    assert names == det_class_names(4) == ['disk', 'square', 'triangle',
                                           'ring']
    seen = set()
    for split, n in (('train', 40), ('val', 8)):
        coco = json.load(open(osp.join(root, 'annotations',
                                       f'instances_{split}.json')))
        assert coco['categories'] == [dict(id=k + 1, name=name)
                                      for k, name in enumerate(names)]
        assert [im['id'] for im in coco['images']] == list(range(n))
        per_image = {}
        for im in coco['images']:
            img = Image.open(osp.join(root, split, im['file_name']))
            assert img.format == 'JPEG' and img.mode == 'RGB'
            assert img.size == (im['width'], im['height']) == (64, 64)
        for ann in coco['annotations']:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert w >= 3 and h >= 3 and ann['iscrowd'] == 0
            # visible pixels fill a good part of their tight box
            assert 0.25 < ann['area'] / (w * h) <= 1
            per_image[ann['image_id']] = per_image.get(ann['image_id'],
                                                       0) + 1
            seen.add(ann['category_id'])
        assert len(per_image) == n  # every image has an object
        assert max(per_image.values()) <= 3
        assert len({a['id'] for a in coco['annotations']}) == \
            len(coco['annotations'])
    assert seen == {1, 2, 3, 4}


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match='num_classes'):
        make_classification_set(str(tmp_path / 'x'), 4, 2, 32, 0, 9)
    with pytest.raises(ValueError, match='image_size'):
        make_segmentation_set(str(tmp_path / 'y'), 4, 2, 16, 0, 5)
    with pytest.raises(ValueError, match='num_classes'):
        make_detection_set(str(tmp_path / 'd'), 4, 2, 32, 0, 7)
    make_classification_set(str(tmp_path / 'z'), 6, 6, 16, 0, 2)
    with pytest.raises(FileExistsError, match='overwrite'):
        make_classification_set(str(tmp_path / 'z'), 6, 6, 16, 0, 2)
    # overwrite replaces the set (no stale images from the first one).
    make_classification_set(str(tmp_path / 'z'), 2, 2, 16, 0, 2,
                            overwrite=True)
    assert len(os.listdir(tmp_path / 'z' / 'train' / 'disk')) == 1


def test_colour_alone_does_not_solve_the_task(tmp_path):
    """Nearest-centroid on mean colour: above chance, far from perfect."""
    root = str(tmp_path)
    names = make_classification_set(root, 240, 240, 24, seed=0,
                                    num_classes=6)

    def features(split):
        x, y = [], []
        for label, name in enumerate(names):
            d = osp.join(root, split, name)
            for f in sorted(os.listdir(d)):
                img = np.asarray(Image.open(osp.join(d, f)), np.float32)
                # colour of the centre region, where the object is
                x.append(img[6:18, 6:18].reshape(-1, 3).mean(0))
                y.append(label)
        return np.array(x), np.array(y)

    xt, yt = features('train')
    xv, yv = features('val')
    centroids = np.stack([xt[yt == k].mean(0) for k in range(6)])
    pred = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), 1)
    acc = (pred == yv).mean()
    assert 1 / 6 + 0.05 < acc < 0.7, acc


def test_cli_writes_both_sets(tmp_path, repo_root):
    spec = importlib.util.spec_from_file_location(
        'make_demo_data', osp.join(repo_root, 'tools', 'make_demo_data.py'))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = str(tmp_path / 'seg')
    cli.main(['seg', '--out', out, '--num-train', '3', '--num-val', '2',
              '--seed', '7'])
    assert len(os.listdir(osp.join(out, 'images', 'training'))) == 3
    with pytest.raises(SystemExit, match='overwrite'):
        cli.main(['seg', '--out', out, '--num-train', '3'])
    ref = str(tmp_path / 'ref')
    make_segmentation_set(ref, 3, 2, 64, seed=7, num_classes=5)
    assert _tree(out) == _tree(ref)  # CLI defaults match the library's
    det = str(tmp_path / 'det')
    cli.main(['det', '--out', det, '--num-train', '2', '--num-val', '1'])
    ref = str(tmp_path / 'det_ref')
    make_detection_set(ref, 2, 1, 96, seed=0, num_classes=4)
    assert _tree(det) == _tree(ref)
