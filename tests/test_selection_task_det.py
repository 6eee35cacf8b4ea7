"""The detection task of the selection grid: ``fine_det`` data and
``benchmarks/selection_task_det.py`` (model, batches, loss, metric, TP)."""
import copy
import os.path as osp
import sys

import numpy as np
import pytest
import torch

pytest.importorskip('mmdet')
sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(
    __file__))), 'benchmarks'))

import selection_task_det as task  # noqa: E402
from cpd_mm.datasets.fine_det import (fine_det_class_names,  # noqa: E402
                                      make_fine_det)

WIDTH = 16  # a narrow model keeps the tests fast


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return task.load_data(str(tmp_path_factory.mktemp('det')), 16, 8)


@pytest.fixture(scope='module')
def model():
    return task.build_model(WIDTH)


def test_generator_is_deterministic_and_index_local():
    a = make_fine_det('val', 5, seed=3)
    b = make_fine_det('val', 5, seed=3)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    # image i does not depend on how many images are drawn
    c = make_fine_det('val', 2, seed=3)
    assert np.array_equal(c[0], a[0][:2])
    n = c[3][-1]
    assert np.array_equal(c[1], a[1][:n]) and np.array_equal(c[2], a[2][:n])
    # another seed or split gives other images
    assert not np.array_equal(make_fine_det('val', 5, seed=4)[0], a[0])
    assert not np.array_equal(make_fine_det('train', 5, seed=3)[0], a[0])


def test_boxes_are_sane():
    x, boxes, labels, off = make_fine_det('train', 24, size=128)
    assert x.shape == (24, 3, 128, 128) and x.dtype == np.uint8
    assert off[0] == 0 and off[-1] == len(boxes) == len(labels)
    per_image = np.diff(off)
    assert per_image.min() >= 1 and per_image.max() <= 5
    assert labels.min() >= 0 and labels.max() < len(fine_det_class_names())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (w >= 1).all() and (h >= 1).all()
    assert boxes.min() >= 0 and boxes.max() <= 128
    # small objects: half-size <= 15% of the side, shapes reach 1.2 of it
    assert w.max() <= 0.36 * 128 + 1 and h.max() <= 0.36 * 128 + 1
    assert len(fine_det_class_names()) == task.NUM_CLASSES == 12


def test_cache_gives_the_same_data(data, tmp_path_factory):
    again = task.load_data(str(tmp_path_factory.mktemp('det2')), 16, 8)
    assert torch.equal(data[0], again[0]) and torch.equal(data[2], again[2])
    for a, b in zip(data[1] + data[3], again[1] + again[3]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(data[0]) == len(data[1]) == 16
    assert len(data[2]) == len(data[3]) == 8


def test_batches_are_seeded_and_boxes_follow_the_image(data):
    def first(seed):
        return next(task.batches(data, 4, torch.Generator().manual_seed(
            seed)))
    (x1, s1), (x2, s2) = first(0), first(0)
    assert torch.equal(x1, x2) and x1.shape == (4, 3, *task.SHAPE)
    for a, b in zip(s1, s2):
        assert torch.equal(a.gt_instances.bboxes, b.gt_instances.bboxes)
    assert not torch.equal(first(1)[0], x1)
    assert sum(1 for _ in task.batches(
        data, 5, torch.Generator().manual_seed(0))) == 3  # 16 // 5
    for s in s1:
        b = s.gt_instances.bboxes
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert b.min() >= 0 and b.max() <= task.SHAPE[0]


def test_augment_moves_boxes_with_the_pixels():
    # one bright square on black: its box must stay on the square after a
    # shift and flip
    x = torch.zeros(8, 3, *task.SHAPE)
    x[:, :, 40:60, 20:30] = 1.0
    box = torch.tensor([[20., 40., 30., 60.]])
    targets = [(box, torch.tensor([3]))] * 8
    out, new = task._augment(x, targets, torch.Generator().manual_seed(0))
    for img, (b, lab) in zip(out, new):
        ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
        assert torch.equal(b[0], torch.tensor([
            xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
        assert lab.tolist() == [3]


def test_model_builds_deterministically(model):
    other = task.build_model(WIDTH)
    for (n, p), (_, q) in zip(model.state_dict().items(),
                              other.state_dict().items()):
        assert torch.equal(p, q), n
    outs = task.forward(model.eval(), task.example())
    assert [t.shape[1] for t in outs[0]] == [task.NUM_CLASSES] * 3
    assert [t.shape[1] for t in outs[1]] == [4] * 3
    assert outs[0][0].shape[2:] == (task.SHAPE[0] // 8, task.SHAPE[1] // 8)


def test_loss_backward(model, data):
    m = copy.deepcopy(model).train()
    x, samples = next(task.batches(data, 4, torch.Generator().manual_seed(
        0)))
    loss = task.loss(m, x, samples)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_optimizer_steps(model, data):
    m = copy.deepcopy(model).train()
    x, samples = next(task.batches(data, 4, torch.Generator().manual_seed(
        0)))
    opt = task.optimizer([p for p in m.parameters() if p.requires_grad],
                         task.DEFAULTS['base_lr'])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]['weight_decay'] == 0.05
    before = copy.deepcopy(m.state_dict())
    opt.zero_grad()
    task.loss(m, x, samples).backward()
    opt.step()
    after = m.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert 'bbox_head.rtm_cls.0.weight' in changed
    assert 'backbone.stem.0.conv.weight' in changed
    assert all(torch.isfinite(v).all() for v in after.values()
               if v.is_floating_point())


def test_coco_map_of_perfect_and_wrong_detections(data):
    targets = data[3]
    perfect = [(b, torch.ones(len(b)), lab) for b, lab in targets]
    assert task.coco_map(targets, perfect) == pytest.approx(100.0)
    wrong = [(b, torch.ones(len(b)), (lab + 1) % task.NUM_CLASSES)
             for b, lab in targets]
    assert task.coco_map(targets, wrong) == 0.0
    shifted = [(b + 4, s, lab) for b, s, lab in perfect]
    assert 0.0 < task.coco_map(targets, shifted) < 100.0


def test_evaluate_untrained_model(model, data):
    score = task.evaluate(copy.deepcopy(model), data)
    assert 0.0 <= score < 5.0


def test_tp_prunes_without_touching_the_output_convs(model):
    import torch_pruning as tp
    m = copy.deepcopy(model).eval()
    heads = task.tp_ignored_layers(m)
    assert len(heads) == 6
    pruner = tp.pruner.MetaPruner(
        m, task.example(), importance=tp.importance.GroupMagnitudeImportance(),
        pruning_ratio=0.5, global_pruning=True, round_to=4,
        ignored_layers=heads, forward_fn=task.forward)
    pruner.step()
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in m.parameters()) < 0.8 * before
    assert [c.out_channels for c in m.bbox_head.rtm_cls] == [12] * 3
    assert [c.out_channels for c in m.bbox_head.rtm_reg] == [4] * 3
    outs = task.forward(m, task.example())
    assert [t.shape[1] for t in outs[0]] == [12] * 3


def test_comb_and_onnx_export(model, tmp_path):
    from cpd_mm.comb import comb_model
    from cpd_mm.deploy import create_session, export_onnx
    m = copy.deepcopy(model).eval()
    comb = comb_model(m, input_shape=(1, 3, *task.SHAPE))
    prunable = {g.name for g in comb.groups if g.prunable}
    assert 'bbox_head.cls_convs.0.0.conv' in prunable
    assert not prunable & {'bbox_head.rtm_cls.0', 'bbox_head.rtm_reg.0'}
    path = str(tmp_path / 'det.onnx')
    export_onnx(m, path, task.SHAPE, force=True)
    sess = create_session(path, ['CPUExecutionProvider'], threads=1)
    x = task.example()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = [t for level in task.forward(m, x) for t in level]
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-4)
