"""What the exported graph computes, and for which input shape.

The ONNX graph has one input and one output:

- ``input``: float32 ``[N, C, H, W]``, the image *after* the model's data
  preprocessor (mean/std normalised, channel order as configured); the
  preprocessor itself is not part of the graph.
- ``logits``:
    * classifier (MMPretrain ``ImageClassifier``): ``[N, num_classes]``, the
      head's raw scores before softmax (``model(x, mode='tensor')``);
    * segmentor (MMSegmentation ``BaseSegmentor``): ``[N, num_classes, H, W]``,
      the decode head's per-pixel scores before softmax, bilinearly resized to
      the input size exactly as ``EncoderDecoder.encode_decode`` does
      (``align_corners`` of the decode head). ``argmax(1)`` is the label map of
      ``mode='predict'`` for whole-image inference at this size.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['CLASSIFICATION', 'SEGMENTATION', 'model_task', 'ClassifierLogits',
           'SegmentorLogits', 'export_module', 'default_input_shape',
           'input_channels']

CLASSIFICATION = 'classification'
SEGMENTATION = 'segmentation'


def model_task(model: nn.Module) -> str:
    """``'classification'`` or ``'segmentation'``, by the model's base class.

    Raises:
        TypeError: the model is neither an MMPretrain ``ImageClassifier`` nor
            an MMSegmentation ``BaseSegmentor``.
    """
    try:
        from mmpretrain.models import ImageClassifier
        if isinstance(model, ImageClassifier):
            return CLASSIFICATION
    except ImportError:
        pass
    try:
        from mmseg.models.segmentors import BaseSegmentor
        if isinstance(model, BaseSegmentor):
            return SEGMENTATION
    except ImportError:
        pass
    raise TypeError(
        f'cannot export a {type(model).__name__}: only MMPretrain '
        'ImageClassifier and MMSegmentation segmentors (BaseSegmentor) are '
        'supported (is mmpretrain / mmsegmentation installed?)')


class ClassifierLogits(nn.Module):
    """``[N, C, H, W]`` image -> ``[N, num_classes]`` classifier logits."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        if not getattr(classifier, 'with_head', True):
            raise ValueError('the classifier has no head: there are no logits '
                             'to export')
        self.model = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode='tensor')


class SegmentorLogits(nn.Module):
    """``[N, C, H, W]`` image -> ``[N, classes, H, W]`` segmentor logits."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.model = segmentor
        head = segmentor.decode_head
        # CascadeEncoderDecoder: the last head makes the prediction.
        if isinstance(head, nn.ModuleList):
            head = head[-1]
        self.align_corners = bool(getattr(head, 'align_corners', False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x, mode='tensor')
        # Same resize as decode_head.predict_by_feat (to img_shape).
        return F.interpolate(logits, size=x.shape[2:], mode='bilinear',
                             align_corners=self.align_corners)


def export_module(model: nn.Module) -> nn.Module:
    """The model as a one-tensor-in, logits-out module (eval mode)."""
    task = model_task(model)
    wrapper = (ClassifierLogits(model)
               if task == CLASSIFICATION else SegmentorLogits(model))
    return wrapper.eval()


def _type_name(transform) -> str:
    t = transform.get('type', '') if isinstance(transform, dict) else ''
    name = t if isinstance(t, str) else getattr(t, '__name__', '')
    return name.split('.')[-1]  # 'mmpretrain.CenterCrop' -> 'CenterCrop'


def _hw(size, order: str = 'hw') -> Optional[Tuple[int, int]]:
    """A size as (h, w). mmpretrain/mmseg random crops take int or (h, w);
    mmcv transforms take int or (w, h) (``order='wh'``)."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = (size[0], size[1]) if order == 'hw' else (size[1], size[0])
        return int(h), int(w)
    return None


def _pipeline(cfg, split):
    loader = cfg.get(f'{split}_dataloader') or {}
    dataset = loader.get('dataset') or {}
    # Wrapped datasets (ConcatDataset / RepeatDataset) keep theirs inside.
    while 'pipeline' not in dataset and isinstance(dataset.get('dataset'),
                                                   dict):
        dataset = dataset['dataset']
    return dataset.get('pipeline') or cfg.get(f'{split}_pipeline') or []


def _pipeline_shape(pipeline, train=False):
    """Fixed output size of a pipeline: its last crop or fixed resize.

    The test pipeline: ``CenterCrop`` or ``Resize`` without ``keep_ratio``
    (mmcv transforms, sizes ``(w, h)``). The train pipeline: ``RandomCrop`` /
    ``RandomResizedCrop`` (sizes ``(h, w)``), for datasets whose test images
    are used at their stored size (CIFAR-style configs).
    """
    shape, source = None, ''
    for t in pipeline:
        name = _type_name(t)
        if train:
            key = {'RandomCrop': 'crop_size',
                   'RandomResizedCrop': 'scale'}.get(name)
            if key and t.get(key) is not None:
                shape, source = _hw(t[key]), f'train pipeline {name}.{key}'
        elif name == 'CenterCrop' and t.get('crop_size') is not None:
            shape = _hw(t['crop_size'], 'wh')
            source = 'test pipeline CenterCrop.crop_size'
        elif (name == 'Resize' and not t.get('keep_ratio', False)
              and t.get('scale') is not None):
            shape = _hw(t['scale'], 'wh')
            source = 'test pipeline Resize.scale'
    return shape, source


def default_input_shape(cfg, task: str) -> Tuple[Optional[Tuple[int, int]],
                                                  str]:
    """``((H, W), where_from)`` read from a config, or ``(None, '')``.

    Classifiers: the test pipeline's ``CenterCrop`` (or a ``Resize`` without
    ``keep_ratio``), else, when the test pipeline keeps the stored image size,
    the train pipeline's random crop. Segmentors: the sliding-window crop of
    ``model.test_cfg`` in slide mode, else ``model.data_preprocessor.size``,
    else the config's ``crop_size`` (mmseg sizes are ``(h, w)``), else the
    pipelines as for classifiers.
    """
    if task == SEGMENTATION:
        model_cfg = cfg.get('model') or {}
        test_cfg = model_cfg.get('test_cfg') or {}
        candidates = [
            (test_cfg.get('crop_size') if test_cfg.get('mode') == 'slide'
             else None, 'model.test_cfg.crop_size'),
            ((model_cfg.get('data_preprocessor') or {}).get('size'),
             'model.data_preprocessor.size'),
            (cfg.get('crop_size'), 'crop_size'),
        ]
        for size, source in candidates:
            if isinstance(size, (tuple, list)) and len(size) == 2:
                return (int(size[0]), int(size[1])), source
            if isinstance(size, int):
                return (size, size), source
    for split in ('test', 'train'):
        shape, source = _pipeline_shape(_pipeline(cfg, split),
                                        train=split == 'train')
        if shape:
            return shape, source
    return None, ''


def input_channels(cfg) -> int:
    """Image channels the backbone expects (``backbone.in_channels``, or 3)."""
    backbone = (cfg.get('model') or {}).get('backbone') or {}
    return int(backbone.get('in_channels', 3) or 3)
