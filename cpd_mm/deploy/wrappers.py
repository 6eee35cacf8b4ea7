"""What the exported graph computes, and for which input shape.

The ONNX graph has one input:

- ``input``: float32 ``[N, C, H, W]``, the image *after* the model's data
  preprocessor (mean/std normalised, channel order as configured); the
  preprocessor itself is not part of the graph.

and, by task, these outputs:

- classifier (MMPretrain ``ImageClassifier``): ``logits``
  ``[N, num_classes]``, the head's raw scores before softmax
  (``model(x, mode='tensor')``);
- segmentor (MMSegmentation ``BaseSegmentor``): ``logits``
  ``[N, num_classes, H, W]``, the decode head's per-pixel scores before
  softmax, bilinearly resized to the input size exactly as
  ``EncoderDecoder.encode_decode`` does (``align_corners`` of the decode
  head). ``argmax(1)`` is the label map of ``mode='predict'`` for
  whole-image inference at this size;
- single-stage detector (MMDetection ``SingleStageDetector``: RetinaNet,
  FCOS, ATSS, YOLOX, RTMDet, ...): the raw maps of the dense head, one output
  per kind and FPN level, ``<kind>_<level>``, e.g. ``cls_score_0 ..
  cls_score_4`` ``[N, priors * classes, H_l, W_l]`` and ``bbox_pred_0 ..``
  (YOLOX adds ``objectness_<l>``, FCOS ``score_factor_<l>``: its
  centerness). These are exactly ``model(x, mode='tensor')``, and the kinds
  are named after the arguments of the head's ``predict_by_feat``, which
  decodes them (anchors, box coder, score threshold, NMS) outside the graph.
  No NMS is in the graph.
"""
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['CLASSIFICATION', 'SEGMENTATION', 'DETECTION', 'model_task',
           'UnsupportedModelError',
           'ClassifierLogits', 'SegmentorLogits', 'DetectorHeadMaps',
           'export_module', 'default_input_shape', 'input_channels']

CLASSIFICATION = 'classification'
SEGMENTATION = 'segmentation'
DETECTION = 'detection'


class UnsupportedModelError(TypeError):
    """The model is of a kind that cannot be exported."""


def model_task(model: nn.Module) -> str:
    """``'classification'``, ``'segmentation'`` or ``'detection'``, by the
    model's base class.

    Raises:
        UnsupportedModelError: the model is neither an MMPretrain
            ``ImageClassifier``, an MMSegmentation ``BaseSegmentor`` nor an
            MMDetection ``SingleStageDetector`` (two-stage detectors need
            proposals and NMS between their stages, which the raw-map export
            leaves out).
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
    try:
        from mmdet.models.detectors import (SingleStageDetector,
                                            TwoStageDetector)
        if isinstance(model, SingleStageDetector):
            return DETECTION
        if isinstance(model, TwoStageDetector):
            raise UnsupportedModelError(
                f'cannot export a {type(model).__name__}: a two-stage '
                'detector runs NMS on its proposals between the stages; only '
                'single-stage (dense) detectors are exported (raw head maps)')
    except ImportError:
        pass
    raise UnsupportedModelError(
        f'cannot export a {type(model).__name__}: only MMPretrain '
        'ImageClassifier, MMSegmentation segmentors (BaseSegmentor) and '
        'MMDetection single-stage detectors are supported (is the codebase '
        'installed?)')


class ClassifierLogits(nn.Module):
    """``[N, C, H, W]`` image -> ``[N, num_classes]`` classifier logits."""

    output_names = ['logits']

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

    output_names = ['logits']

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


class DetectorHeadMaps(nn.Module):
    """``[N, C, H, W]`` image -> the dense head's per-level raw maps.

    The outputs are ``model(x, mode='tensor')`` flattened: for each kind of
    map the head returns, one tensor per level. Kinds are named after the
    leading arguments of the head's ``predict_by_feat`` (``cls_scores``,
    ``bbox_preds``, then e.g. ``objectnesses`` or ``score_factors``), so
    ``output_names`` reads ``cls_score_0, ..., bbox_pred_0, ...``; it is set
    by the first forward pass (heads differ in how many kinds they return).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.model = detector
        head = detector.bbox_head
        self.levels = len(head.prior_generator.strides)
        self.kinds = []
        for name in inspect.signature(head.predict_by_feat).parameters:
            if name in ('self', 'batch_img_metas', 'cfg', 'rescale',
                        'with_nms'):
                break
            self.kinds.append(_singular(name))
        self.output_names = None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = self.model(x, mode='tensor')
        if len(outs) > len(self.kinds) or any(
                len(per_level) != self.levels for per_level in outs):
            raise ValueError(
                f'{type(self.model.bbox_head).__name__} returned '
                f'{len(outs)} kinds of maps of {[len(o) for o in outs]} '
                f'levels; expected at most {len(self.kinds)} kinds '
                f'({self.kinds}) of {self.levels} levels')
        self.output_names = [f'{kind}_{level}'
                             for kind in self.kinds[:len(outs)]
                             for level in range(self.levels)]
        return tuple(t for per_level in outs for t in per_level)


def _singular(name: str) -> str:
    """'cls_scores' -> 'cls_score', 'objectnesses' -> 'objectness'."""
    if name.endswith('nesses'):
        return name[:-2]
    return name[:-1] if name.endswith('s') else name


def export_module(model: nn.Module) -> nn.Module:
    """The model as a one-tensor-in module (eval mode) whose outputs are
    named by its ``output_names`` (``['logits']``, or the detector maps,
    known after a forward pass)."""
    task = model_task(model)
    if task == DETECTION:
        wrapper = DetectorHeadMaps(model)
    elif task == CLASSIFICATION:
        wrapper = ClassifierLogits(model)
    else:
        wrapper = SegmentorLogits(model)
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
    pipelines as for classifiers. Detectors: the test pipeline's last
    ``Pad.size`` or ``Resize.scale`` (with ``keep_ratio`` the images are at
    most that large), else the pipelines as for classifiers.
    """
    if task == DETECTION:
        shape, source = None, ''
        for t in _pipeline(cfg, 'test'):
            name = _type_name(t)
            key = {'Pad': 'size', 'Resize': 'scale'}.get(name)
            if key and _hw(t.get(key), 'wh'):
                shape = _hw(t[key], 'wh')
                source = f'test pipeline {name}.{key}'
                if name == 'Resize' and t.get('keep_ratio', False):
                    source += ' (keep_ratio: the largest size)'
        if shape:
            return shape, source
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
