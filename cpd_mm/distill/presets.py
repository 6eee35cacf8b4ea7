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
              'mmseg': 'mmseg', 'mmsegmentation': 'mmseg'}

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
}


def build_distill_cfg(kind: str, codebase: str) -> List[dict]:
    """Return the ``distill`` list of a preset.

    Args:
        kind (str): ``'none'``, ``'kl'``, ``'cwd'`` or ``'cirkd'``
            (case-insensitive).
        codebase (str): ``'mmpretrain'`` (classifiers) or ``'mmseg'``
            (segmentors).

    Returns:
        list[dict]: items ``dict(type=<loss>, name=..., student=<source>,
        teacher=<source>, **loss args)`` for :class:`CPDDistiller`.

    Raises:
        ValueError: for an unknown kind or codebase, or a kind that needs
            dense predictions (CWD, CIRKD) with a classifier.
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
    if (codebase, kind) not in _PRESETS:
        raise ValueError(f"distill type '{kind}' needs dense predictions; "
                         "classifiers support 'kl' and 'none'")
    return copy.deepcopy(_PRESETS[(codebase, kind)])
