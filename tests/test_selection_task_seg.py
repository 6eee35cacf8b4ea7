"""The segmentation task of the selection grid (``benchmarks/
selection_task_seg.py``) and its data (``cpd_mm.datasets.fine_scenes``).

The scenes must be the same for the same arguments (every arm and rerun
sees one data set) and labelled as drawn; the task's model, loss, metric and
TP trace must work on the segmentor (auxiliary head included, output convs
untouched).
"""
import os.path as osp
import sys

import numpy as np
import pytest
import torch

from cpd_mm.datasets.fine_scenes import (NUM_CLASSES, THIN, make_fine_scenes,
                                         scene_class_names)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import selection_arms as sa  # noqa: E402
import selection_task_seg as task  # noqa: E402


def test_fine_scenes_is_deterministic():
    x, y = make_fine_scenes('val', 4, seed=3)
    x2, y2 = make_fine_scenes('val', 6, seed=3)
    # scene i depends on (seed, split, i) only, not on how many are drawn
    assert np.array_equal(x, x2[:4]) and np.array_equal(y, y2[:4])
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.uint8
    assert y.shape == (4, 64, 64) and y.dtype == np.uint8
    assert not np.array_equal(x, make_fine_scenes('val', 4, seed=4)[0])
    assert not np.array_equal(x, make_fine_scenes('train', 4, seed=3)[0])
    with pytest.raises(ValueError, match='split must be one of'):
        make_fine_scenes('test', 2)


def test_load_data_caches(tmp_path):
    data = task.load_data(str(tmp_path), 4, 2)
    assert [tuple(d.shape) for d in data] == [
        (4, 3, 64, 64), (4, 64, 64), (2, 3, 64, 64), (2, 64, 64)]
    assert data[1].dtype == torch.int64
    assert (tmp_path / 'fine_scenes_4_2.npz').exists()
    x, y = make_fine_scenes('val', 2)
    again = task.load_data(str(tmp_path), 4, 2)  # from the cache
    assert np.array_equal(again[2].numpy(), x)
    assert np.array_equal(again[3].numpy(), y)


def _erode(mask, k=5):
    """k x k binary erosion (pixels whose whole neighbourhood is set)."""
    p = np.pad(mask, k // 2)
    h, w = mask.shape
    return np.logical_and.reduce([p[i:i + h, j:j + w] for i in range(k)
                                  for j in range(k)])


def test_fine_scenes_labels():
    x, y = make_fine_scenes('train', 120)
    assert len(scene_class_names()) == NUM_CLASSES == task.NUM_CLASSES
    counts = np.bincount(y.ravel(), minlength=NUM_CLASSES)
    assert len(counts) == NUM_CLASSES and (counts > 0).all()
    assert 0.5 < counts[0] / counts.sum() < 0.9  # background dominates
    thin = y == THIN
    objects = (y > 0) & (y < THIN)
    eroded_thin = sum(_erode(m).sum() for m in thin)
    eroded_obj = sum(_erode(m).sum() for m in objects)
    # strokes are 2-3 px wide: almost nothing survives a 5x5 erosion
    # (crossings do); objects are blobs: most of them survives
    assert eroded_thin < 0.05 * thin.sum()
    assert eroded_obj > 0.5 * objects.sum()
    # labelled pixels differ from the background around them: an image
    # with every object removed is not what was drawn
    assert (x.std(axis=(2, 3)) > 10).all()


def test_batches_flip_images_and_labels_alike():
    x, y = make_fine_scenes('train', 8)
    data = (torch.from_numpy(x), torch.from_numpy(y).long())
    out = list(task.batches(data, 4, torch.Generator().manual_seed(0)))
    again = list(task.batches(data, 4, torch.Generator().manual_seed(0)))
    assert len(out) == 2
    for (xb, yb), (xa, ya) in zip(out, again):
        assert torch.equal(xb, xa) and torch.equal(yb, ya)
    for xb, yb in out:
        assert xb.dtype == torch.float32 and yb.shape == (4, 64, 64)
        for xi, yi in zip(xb, yb):
            # the same flips on the image and its label map
            match = [(fx, fy) for fx in (False, True) for fy in (False, True)
                     if any(torch.equal(_flip(task.normalise(data[0][k]),
                                              fx, fy), xi) and
                            torch.equal(_flip(data[1][k], fx, fy), yi)
                            for k in range(8))]
            assert match


def _flip(t, fx, fy):
    if fx:
        t = t.flip(-1)
    if fy:
        t = t.flip(-2)
    return t


@pytest.fixture(scope='module')
def tiny():
    """A width-8 model and 8 / 4 scenes."""
    torch.manual_seed(0)
    x, y = make_fine_scenes('train', 8)
    vx, vy = make_fine_scenes('val', 4)
    data = tuple(torch.from_numpy(a) for a in (x, y, vx, vy))
    data = (data[0], data[1].long(), data[2], data[3].long())
    return task.build_model(8), data


def test_model_loss_and_metric(tiny):
    model, data = tiny
    assert model.backbone.stem[0].out_channels == 4  # ResNetV1c: width / 2
    assert model.decode_head.conv_seg.out_channels == NUM_CLASSES
    model.eval()
    out = task.forward(model, task.example())
    assert out.shape == (1, NUM_CLASSES, 8, 8)  # output stride 8
    model.train()
    xb, yb = next(task.batches(data, 4, torch.Generator().manual_seed(0)))
    model.zero_grad()
    loss = task.loss(model, xb, yb)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    # both heads are in the loss
    for head in (model.decode_head, model.auxiliary_head):
        assert head.conv_seg.weight.grad.abs().sum() > 0
    conf = task.confusion(model, data)
    assert int(conf.sum()) == 4 * 64 * 64
    miou = task.evaluate(model, data)
    assert 0.0 <= miou <= 100.0
    ious = task.iou(conf).numpy()
    assert miou == pytest.approx(np.nanmean(ious))


def test_iou_from_confusion():
    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    conf[0, 0], conf[0, 1], conf[1, 1], conf[2, 0] = 6, 2, 2, 2
    ious = task.iou(conf).numpy()
    # class 0: 6 / (6 + 2 + 2); class 1: 2 / (2 + 2); class 2: 0 / 2
    assert ious[:3] == pytest.approx([60.0, 50.0, 0.0])
    assert np.isnan(ious[3:]).all()  # absent classes do not count


def test_tp_prunes_backbone_and_heads_not_outputs(tiny):
    model, data = tiny
    before = [p.shape for p in model.parameters()]
    pruned, history = sa.tp_prune(task, model, 'magnitude', 0.5, None, 4)
    assert [p.shape for p in model.parameters()] == before  # a copy
    assert history
    for head in (pruned.decode_head, pruned.auxiliary_head):
        assert head.conv_seg.out_channels == NUM_CLASSES
    # the auxiliary head reads stage 3, which TP pruned through its trace
    assert pruned.backbone.layer3[-1].conv2.out_channels < 32
    assert pruned.auxiliary_head.convs[0].conv.in_channels == \
        pruned.backbone.layer3[-1].conv2.out_channels
    assert pruned.decode_head.conv_seg.in_channels < 16
    pruned.eval()
    assert task.forward(pruned, task.example()).shape == \
        (1, NUM_CLASSES, 8, 8)
    xb, yb = next(task.batches(data, 4, torch.Generator().manual_seed(0)))
    pruned.train()
    task.loss(pruned, xb, yb).backward()
