"""Knowledge distillation for sigmoid classifiers: per-class Bernoulli KL."""
from typing import List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor

from .shapes import check_pair

_NORMALIZERS = ('teacher', 'anchors')


def _levels(preds) -> List[Tensor]:
    return list(preds) if isinstance(preds, (list, tuple)) else [preds]


@MODELS.register_module()
class BinaryKLDivergence(nn.Module):
    """KL(teacher ‖ student) per anchor and class for sigmoid scores.

    Dense detectors with sigmoid classification (RetinaNet, FCOS, ATSS, GFL,
    RTMDet, YOLOX) score every class independently at every anchor (or
    point): ``p = sigmoid(z)`` is the probability that class c is there. The
    classes do not form one distribution (a background anchor has every p
    near 0), so a softmax KL over classes would distil a competition the head
    never learnt. This loss compares, per anchor and class, the two
    Bernoulli distributions at temperature ``tau``::

        p = sigmoid(z / tau)
        KL = p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s))

    summed over anchors and classes, divided by a normaliser, times
    ``tau ** 2`` and ``loss_weight``. The KL is the binary cross-entropy with
    the teacher's probabilities as soft targets minus the teacher's entropy
    (a constant), so its gradient is ``(p_s - p_t) / tau`` per logit.

    Normalisers: ``'teacher'`` (default) divides by the teacher's expected
    number of positives, ``sum(p_t)`` over the batch (at least 1), as the
    focal and quality focal losses divide by the number (or quality sum) of
    positive anchors; most anchors are confident background with a KL near
    0, so a plain mean would make the term vanish next to the task loss.
    ``'anchors'`` divides by the number of anchors (positions × priors of all
    levels), i.e. the mean per-anchor KL summed over classes.

    Inputs are the head's class maps: ``(N, priors * C, H, W)``, or a list
    of them (one per FPN level, the ``'logits'`` source of a detector; all
    levels count together), or ``(M, C)`` scores.

    Args:
        num_classes (int): classes C scored per prior (the head's
            ``cls_out_channels``); the channel number of every map must be a
            multiple of it. The distiller reads it from the head.
        tau (float): temperature. Defaults to 1.0.
        loss_weight (float): weight of the loss. Defaults to 1.0.
        normalizer (str): ``'teacher'`` or ``'anchors'``, see above.
            Defaults to ``'teacher'``.
    """

    requires_labels = False
    multi_level = True

    def __init__(self,
                 num_classes: int,
                 tau: float = 1.0,
                 loss_weight: float = 1.0,
                 normalizer: str = 'teacher'):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f'`num_classes` must be a positive int, but got '
                             f'{num_classes!r}')
        if tau <= 0:
            raise ValueError(f'`tau` must be > 0, but got {tau}')
        if normalizer not in _NORMALIZERS:
            raise ValueError(f'`normalizer` must be one of {_NORMALIZERS}, '
                             f'but got {normalizer!r}')
        self.num_classes = num_classes
        self.tau = tau
        self.loss_weight = loss_weight
        self.normalizer = normalizer

    def forward(self,
                preds_S: Union[Tensor, Sequence[Tensor]],
                preds_T: Union[Tensor, Sequence[Tensor]],
                gt: Optional[Tensor] = None) -> Tensor:
        """Compute the loss.

        Args:
            preds_S: student logits, one tensor or one per level.
            preds_T: teacher logits of the same shapes; detached here.
            gt: unused (accepted so every loss has the same signature).
        """
        levels_S, levels_T = _levels(preds_S), _levels(preds_T)
        if len(levels_S) != len(levels_T):
            raise ValueError(f'BinaryKLDivergence: {len(levels_S)} student '
                             f'levels but {len(levels_T)} teacher levels')
        total = None
        anchors, mass = 0, None
        for s, t in zip(levels_S, levels_T):
            check_pair('BinaryKLDivergence', s, t, ndims=(2, 4))
            if s.shape != t.shape:
                raise ValueError('BinaryKLDivergence: student '
                                 f'{tuple(s.shape)} and teacher '
                                 f'{tuple(t.shape)} differ in shape')
            if s.shape[1] % self.num_classes:
                raise ValueError(
                    f'BinaryKLDivergence: {s.shape[1]} channels are not a '
                    f'multiple of num_classes={self.num_classes} (a softmax '
                    'head with a background class? use KLDivergence)')
            t = t.detach()
            z_s, z_t = s / self.tau, t / self.tau
            p_t = torch.sigmoid(z_t)
            # log p = logsigmoid(z), log(1 - p) = logsigmoid(-z): stable
            kl = p_t * (F.logsigmoid(z_t) - F.logsigmoid(z_s)) + \
                (1 - p_t) * (F.logsigmoid(-z_t) - F.logsigmoid(-z_s))
            total = kl.sum() if total is None else total + kl.sum()
            anchors += s.numel() // self.num_classes
            mass = p_t.sum() if mass is None else mass + p_t.sum()
        norm = mass.clamp_min(1.0) if self.normalizer == 'teacher' \
            else float(anchors)
        return self.loss_weight * self.tau**2 * total / norm
