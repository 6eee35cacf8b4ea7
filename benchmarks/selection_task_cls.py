"""Task ``cls`` of ``selection_grid.py``: classification on
:mod:`cpd_mm.datasets.fine_shapes` (24 classes, 64x64) with MMPretrain's
``ImageClassifier`` and a ResNet-18 at half width (32..256 channels; at a
quarter width its onnxruntime latency is mostly per-op overhead, see
docs/selection_benchmark.md).

A task module gives the grid its data, model, loss and metric; the
pruning arms and the training loop are generic (``selection_arms.py``).
"""
import os
import os.path as osp

import numpy as np
import torch
import torch.nn.functional as F

TASK = 'cls'
METRIC = 'top-1'
TITLE = 'fine_shapes (24 classes, 64x64)'
SHAPE = (64, 64)
NUM_CLASSES = 24
DEFAULTS = dict(width=32, num_train=7200, num_val=2400, base_epochs=48,
                base_lr=0.1, epochs=3, lr=0.02, batch=64, round_to=16)


def load_data(cache_dir, num_train, num_val, textures=None):
    """``(train_x, train_y, val_x, val_y)`` uint8 / int64 tensors, drawn
    once and cached as ``.npz`` under ``cache_dir``; ``textures``: the
    class textures of ``make_fine_shapes`` (default its three)."""
    from cpd_mm.datasets.fine_shapes import FINE_TEXTURES, make_fine_shapes
    textures = tuple(textures or FINE_TEXTURES)
    tag = '' if textures == FINE_TEXTURES else '_' + '-'.join(textures)
    path = osp.join(cache_dir, f'fine_shapes{tag}_{num_train}_{num_val}.npz')
    if not osp.exists(path):
        tx, ty = make_fine_shapes('train', num_train, size=SHAPE[0],
                                  textures=textures)
        vx, vy = make_fine_shapes('val', num_val, size=SHAPE[0],
                                  textures=textures)
        np.savez(path + '.tmp.npz', tx=tx, ty=ty, vx=vx, vy=vy)
        os.replace(path + '.tmp.npz', path)
    d = np.load(path)
    return tuple(torch.from_numpy(d[k]) for k in ('tx', 'ty', 'vx', 'vy'))


def build_model(width=32, num_classes=NUM_CLASSES):
    """MMPretrain's ResNet-18 classifier with ``width`` stem and first-stage
    channels (64 upstream; 32: 32..256, 37 MFLOPs at 64x64)."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    import mmpretrain.models  # noqa: F401  (registers the classes)
    # whatever scope the caller set last (an mmseg runner's, say)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ResNet', depth=18, stem_channels=width,
                          base_channels=width),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=num_classes,
                      in_channels=8 * width)))


def forward(model, x):
    return model(x, mode='tensor')


def normalise(x):
    return (x.float() - 127.5) / 64.0


def augment(x, gen):
    """Random crop (zero pad 4) and horizontal flip, per image."""
    n, c, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n, ), generator=gen)
    dx = torch.randint(0, 9, (n, ), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = pad[torch.arange(n)[:, None, None, None],
              torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def batches(data, batch, gen):
    """Augmented training batches in a random order (the last partial
    batch dropped)."""
    x, y = data[0], data[1]
    perm = torch.randperm(len(x), generator=gen)
    for i in range(0, len(x) - batch + 1, batch):
        idx = perm[i:i + batch]
        yield augment(normalise(x[idx]), gen), y[idx]


def loss(model, inputs, targets):
    return F.cross_entropy(forward(model, inputs), targets)


@torch.no_grad()
def evaluate(model, data, batch=256):
    """Top-1 (%) on the validation images."""
    vx, vy = data[2], data[3]
    model.eval()
    right = sum(int((forward(model, normalise(vx[i:i + batch])).argmax(1)
                     == vy[i:i + batch]).sum())
                for i in range(0, len(vx), batch))
    return 100.0 * right / len(vx)


def tp_ignored_layers(model):
    return [model.head.fc]


def example(batch=1):
    return torch.randn(batch, 3, *SHAPE,
                       generator=torch.Generator().manual_seed(0))
