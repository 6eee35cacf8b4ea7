"""Task ``seg`` of ``selection_grid.py``: semantic segmentation on
:mod:`cpd_mm.datasets.fine_scenes` (14 classes: background, 12 (shape,
texture) classes, 2-3 px thin strokes; 64x64) with MMSegmentation's
``EncoderDecoder``: the demo PSPNet (``configs/demo/pspnet_r18_demo-seg.py``:
ResNetV1c-18, output stride 8, PSP decode head, FCN auxiliary head) at
``width`` stem and first-stage channels.

The training loss is the model's own (``model.loss``: decode head
cross-entropy + 0.4 x the auxiliary head's, both on the logits resized to
the label size); the metric is mIoU (%) from one confusion matrix over all
validation pixels, on the decode head's logits resized to the label size as
``EncoderDecoder`` does. TP traces with :func:`cpd_mm.comb.default_forward`
(``tp_forward``) so that the auxiliary head is in its graph and its input
shrinks with the backbone.
"""
import os
import os.path as osp

import numpy as np
import torch
import torch.nn.functional as F

TASK = 'seg'
METRIC = 'mIoU'
TITLE = 'fine_scenes (14 classes, 64x64)'
SHAPE = (64, 64)
NUM_CLASSES = 14
# Sizing, measured on one core (onnxruntime, 1 thread, quiet machine):
# width 24 runs in 2.7 ms, width 8 in 0.52 ms, width 4 in 0.31 ms, so 70%
# of the latency can go (width 16: 1.26 ms, and round_to 8 would stop near
# 0.5 ms, 40%); training costs about 10 ms per image (batch 32), 20 epochs
# of 2000 images took 513 s (baseline mIoU 48.5), a run of the grid 50-60 s.
DEFAULTS = dict(width=24, num_train=2000, num_val=1000, base_epochs=20,
                base_lr=0.1, epochs=2, lr=0.02, batch=16, round_to=8)


def load_data(cache_dir, num_train, num_val):
    """``(train_x, train_y, val_x, val_y)``: uint8 images ``(N, 3, H, W)``
    and int64 label maps ``(N, H, W)``, drawn once and cached as ``.npz``
    under ``cache_dir``."""
    from cpd_mm.datasets.fine_scenes import make_fine_scenes
    path = osp.join(cache_dir, f'fine_scenes_{num_train}_{num_val}.npz')
    if not osp.exists(path):
        tx, ty = make_fine_scenes('train', num_train, size=SHAPE[0])
        vx, vy = make_fine_scenes('val', num_val, size=SHAPE[0])
        np.savez(path + '.tmp.npz', tx=tx, ty=ty, vx=vx, vy=vy)
        os.replace(path + '.tmp.npz', path)
    d = np.load(path)
    return (torch.from_numpy(d['tx']), torch.from_numpy(d['ty']).long(),
            torch.from_numpy(d['vx']), torch.from_numpy(d['vy']).long())


def build_model(width=24):
    """The demo PSPNet (ResNetV1c-18, dilated, output stride 8) with
    ``width`` stem and first-stage channels (``width``..``8 * width``), a
    PSP head of ``2 * width`` channels and an FCN auxiliary head of
    ``width`` channels (the demo's proportions: 16 / 32 / 16)."""
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    bn = dict(type='BN', requires_grad=True)
    head = dict(num_classes=NUM_CLASSES, norm_cfg=bn, dropout_ratio=0.1,
                align_corners=False)
    # whatever scope the caller set last (an mmpretrain runner's, say)
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(dict(
            type='EncoderDecoder', pretrained=None,
            backbone=dict(
                type='ResNetV1c', depth=18, num_stages=4,
                out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                strides=(1, 2, 1, 1), norm_cfg=bn, norm_eval=False,
                style='pytorch', contract_dilation=True, stem_channels=width,
                base_channels=width),
            decode_head=dict(
                type='PSPHead', in_channels=8 * width, in_index=3,
                channels=2 * width, pool_scales=(1, 2, 3, 6),
                loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                 loss_weight=1.0), **head),
            auxiliary_head=dict(
                type='FCNHead', in_channels=4 * width, in_index=2,
                channels=width, num_convs=1, concat_input=False,
                loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                 loss_weight=0.4), **head),
            train_cfg=dict(), test_cfg=dict(mode='whole')))


def forward(model, x):
    """The decode head's logits (output stride 8): what ONNX export (which
    adds the resize to the input size) and cpd_mm's comb see."""
    return model(x, mode='tensor')


def tp_forward(model, x):
    """TP's trace: decode and auxiliary heads (see module doc)."""
    from cpd_mm.comb import default_forward
    return default_forward(model, x)


def normalise(x):
    return (x.float() - 127.5) / 64.0


def augment(x, y, gen):
    """Random horizontal and vertical flips, per image, of images and
    labels alike (objects are drawn at random rotations)."""
    x, y = x.clone(), y.clone()
    for dim in (-1, -2):
        flip = torch.rand(len(x), generator=gen) < 0.5
        x[flip] = x[flip].flip(dim)
        y[flip] = y[flip].flip(dim)
    return x, y


def batches(data, batch, gen):
    """Augmented training batches ``(inputs, labels)`` in a random order
    (the last partial batch dropped)."""
    x, y = data[0], data[1]
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) - batch + 1, batch):
        idx = perm[i:i + batch]
        xb, yb = augment(x[idx], y[idx], gen)
        yield normalise(xb), yb


def data_samples(targets):
    """``SegDataSample`` per label map, as ``PackSegInputs`` makes them."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    h, w = targets.shape[-2:]
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
    out = []
    for t in targets:
        s = SegDataSample(metainfo=meta)
        s.gt_sem_seg = PixelData(data=t[None])
        out.append(s)
    return out


def loss(model, inputs, targets):
    """The segmentor's own training loss (decode + auxiliary heads)."""
    losses = model.loss(inputs, data_samples(targets))
    return sum(v for k, v in losses.items() if 'loss' in k)


def logits(model, x, size):
    """Decode-head logits resized to ``size`` as ``EncoderDecoder`` does."""
    return F.interpolate(forward(model, x), size=size, mode='bilinear',
                         align_corners=model.decode_head.align_corners)


def confusion(model, data, batch=100):
    """``(NUM_CLASSES, NUM_CLASSES)`` counts (rows: label, columns:
    prediction) over all validation pixels."""
    vx, vy = data[2], data[3]
    model.eval()
    conf = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(vx), batch):
            pred = logits(model, normalise(vx[i:i + batch]),
                          vy.shape[-2:]).argmax(1)
            conf += torch.bincount(
                (vy[i:i + batch] * NUM_CLASSES + pred).flatten(),
                minlength=NUM_CLASSES * NUM_CLASSES)
    return conf.view(NUM_CLASSES, NUM_CLASSES)


def iou(conf):
    """Per-class IoU (%); NaN for a class absent from labels and
    predictions."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return 100.0 * tp / union


def evaluate(model, data):
    """mIoU (%) over the classes present, from one confusion matrix."""
    return float(np.nanmean(iou(confusion(model, data)).numpy()))


def tp_ignored_layers(model):
    """The output convs of the decode and auxiliary heads."""
    return [model.decode_head.conv_seg, model.auxiliary_head.conv_seg]


def example(batch=1):
    return torch.randn(batch, 3, *SHAPE,
                       generator=torch.Generator().manual_seed(0))
