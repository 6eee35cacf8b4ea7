"""Vanilla knowledge distillation (Hinton et al., 2015) on logits."""
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor

from .shapes import check_pair, resize_labels, resize_to, zero_like_graph


@MODELS.register_module()
class KLDivergence(nn.Module):
    """KL(teacher ‖ student) between temperature-softened class distributions.

    Works on class logits ``(N, C)`` and on per-pixel logits ``(N, C, H, W)``
    (the softmax runs over C at every pixel). The result is multiplied by
    ``tau ** 2`` so that gradient magnitudes do not shrink with the
    temperature (Hinton et al.), then by ``loss_weight``.

    On features whose channels pruning removes, the distiller restricts
    the teacher to the kept channels (see
    :meth:`CPDDistiller.follow_student_shrink`): the softmax runs over the
    kept channels only, i.e. the gated student's loss recomputed on the
    kept channels (the gated softmax also counted each removed channel as
    a logit 0). Logits are never pruned.

    Resizing: if student and teacher maps differ in H, W the student logits
    are bilinearly resized to the teacher's size; a label map given for
    ``ignore_index`` is nearest-resized to the logits' size (logits of
    segmenters are usually at 1/8 of the label resolution).

    Args:
        tau (float): temperature. Defaults to 1.0.
        loss_weight (float): weight of the loss. Defaults to 1.0.
        reduction (str): ``'mean'`` averages the per-sample (or per-pixel)
            KL over samples (or over non-ignored pixels), i.e. torch's
            ``batchmean``; ``'sum'`` sums it; ``'none'`` returns it with
            shape ``(N,)`` or ``(N, H, W)``, ignored pixels set to 0.
            Defaults to ``'mean'``.
        ignore_index (int, optional): label of pixels that do not count.
            Only used for 4-d logits when the caller passes a label map;
            ``None`` distils every pixel. Defaults to None.
    """

    requires_labels = False

    def __init__(self,
                 tau: float = 1.0,
                 loss_weight: float = 1.0,
                 reduction: str = 'mean',
                 ignore_index: Optional[int] = None):
        super().__init__()
        if tau <= 0:
            raise ValueError(f'`tau` must be > 0, but got {tau}')
        if reduction not in ('mean', 'sum', 'none'):
            raise ValueError("`reduction` must be 'mean', 'sum' or 'none', "
                             f'but got {reduction!r}')
        self.tau = tau
        self.loss_weight = loss_weight
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self,
                preds_S: Tensor,
                preds_T: Tensor,
                gt: Optional[Tensor] = None) -> Tensor:
        """Compute the loss.

        Args:
            preds_S (Tensor): student logits, (N, C) or (N, C, H, W).
            preds_T (Tensor): teacher logits of the same N and C; detached
                here, so no gradient ever reaches the teacher.
            gt (Tensor, optional): label map (N, H', W') for
                ``ignore_index``. Ignored for 2-d logits.
        """
        check_pair('KLDivergence', preds_S, preds_T, ndims=(2, 4))
        preds_T = preds_T.detach()
        if preds_S.dim() == 4:
            preds_S = resize_to(preds_S, preds_T.shape[-2:])
        log_p_s = F.log_softmax(preds_S / self.tau, dim=1)
        log_p_t = F.log_softmax(preds_T / self.tau, dim=1)
        # KL summed over classes: one value per sample or per pixel
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)

        valid = None
        if (preds_S.dim() == 4 and gt is not None
                and self.ignore_index is not None):
            labels = resize_labels(gt.to(kl.device), kl.shape[-2:])
            valid = labels != self.ignore_index
            kl = kl * valid

        if self.reduction == 'sum':
            loss = kl.sum()
        elif self.reduction == 'none':
            loss = kl
        elif valid is None:
            loss = kl.mean()
        elif valid.any():
            loss = kl.sum() / valid.sum()
        else:
            loss = zero_like_graph(kl)
        return self.loss_weight * self.tau**2 * loss
