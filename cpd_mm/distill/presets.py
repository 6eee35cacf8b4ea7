"""Preset distillation setups: the one-line switch of the ablation.

``CPDDistiller(distill='cwd')`` (or ``'kl'``, ``'cirkd'``, ``'none'``) expands
to the list returned by :func:`build_distill_cfg` for the student's codebase.
Print it to start a custom list::

    >>> from cpd_mm.distill import build_distill_cfg
    >>> build_distill_cfg('cirkd', 'mmseg')
"""
import copy
from typing import List

DISTILL_TYPES = ('none', 'kl', 'cwd', 'cirkd')

_CODEBASES = {'mmpretrain': 'mmpretrain', 'mmcls': 'mmpretrain',
              'mmseg': 'mmseg', 'mmsegmentation': 'mmseg',
              'mmdet': 'mmdet', 'mmdetection': 'mmdet'}

# vanilla KD on logits (CIRKD's official scripts also use tau=1, weight 1)
_KL = dict(type='KLDivergence', name='kl', student='logits',
           teacher='logits', tau=1.0, loss_weight=1.0)

_PRESETS = {
    ('mmpretrain', 'kl'): [_KL],
    ('mmseg', 'kl'): [_KL],
    # mmrazor's CWD setting for PSPNet on Cityscapes: logits, tau=1, weight 3
    ('mmseg', 'cwd'): [
        dict(type='ChannelWiseDivergence', name='cwd', student='logits',
             teacher='logits', tau=1.0, loss_weight=3.0)
    ],
    # the published CIRKD = logits KD + relation terms on the embeddings;
    # num_classes, widths and ignore_index are read from the models
    ('mmseg', 'cirkd'): [
        _KL,
        dict(type='CIRKDLoss', name='cirkd', student='pre_logits',
             teacher='pre_logits')
    ],
    # dense detectors: per-anchor, per-class Bernoulli KL on the sigmoid
    # class maps of every FPN level (see BinaryKLDivergence)
    ('mmdet', 'kl'): [
        dict(type='BinaryKLDivergence', name='kl', student='logits',
             teacher='logits', tau=1.0, loss_weight=1.0)
    ],
    # CWD on the FPN outputs, one term per level, summed: mmrazor's setting
    # for RetinaNet and Faster R-CNN on COCO (tau=1, weight 10 per level)
    ('mmdet', 'cwd'): [
        dict(type='ChannelWiseDivergence', name='cwd', student='neck',
             teacher='neck', tau=1.0, loss_weight=10.0)
    ],
}


def build_distill_cfg(kind: str, codebase: str) -> List[dict]:
    """Return the ``distill`` list of a preset.

    Args:
        kind (str): ``'none'``, ``'kl'``, ``'cwd'`` or ``'cirkd'``
            (case-insensitive).
        codebase (str): ``'mmpretrain'`` (classifiers), ``'mmseg'``
            (segmentors) or ``'mmdet'`` (detectors: ``'kl'`` is
            :class:`BinaryKLDivergence` on the class maps of a dense head,
            ``'cwd'`` is CWD on the FPN levels).

    Returns:
        list[dict]: items ``dict(type=<loss>, name=..., student=<source>,
        teacher=<source>, **loss args)`` for :class:`CPDDistiller`.

    Raises:
        ValueError: for an unknown kind or codebase, a kind that needs
            dense predictions (CWD, CIRKD) with a classifier, or CIRKD
            (segmentation relations) with a detector.
    """
    if not isinstance(kind, str) or kind.lower() not in DISTILL_TYPES:
        raise ValueError(f'distill type must be one of {DISTILL_TYPES}, '
                         f'but got {kind!r}')
    if codebase not in _CODEBASES:
        raise ValueError(f'codebase must be one of {sorted(_CODEBASES)}, '
                         f'but got {codebase!r}')
    kind, codebase = kind.lower(), _CODEBASES[codebase]
    if kind == 'none':
        return []
    if (codebase, kind) not in _PRESETS and codebase == 'mmdet':
        raise ValueError(f"distill type '{kind}' is for segmentors; "
                         "detectors support 'kl', 'cwd' and 'none'")
    if (codebase, kind) not in _PRESETS:
        raise ValueError(f"distill type '{kind}' needs dense predictions; "
                         "classifiers support 'kl' and 'none'")
    return copy.deepcopy(_PRESETS[(codebase, kind)])
