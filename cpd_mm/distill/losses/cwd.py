"""Channel-wise distillation (Shu et al., ICCV 2021) for dense prediction."""
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor

from .shapes import check_pair, resize_to


@MODELS.register_module()
class ChannelWiseDivergence(nn.Module):
    """KL(teacher ‖ student) between per-channel spatial distributions.

    Each channel of a ``(N, C, H, W)`` map is turned into a distribution over
    its H·W positions by a softmax at temperature ``tau``; the KL divergence
    of the student's from the teacher's distribution is summed over
    positions, summed over all N·C channels and divided by N·C, then
    multiplied by ``tau ** 2`` and ``loss_weight``. Usually applied to
    segmentation logits, where channel c is "where class c is".

    If the maps differ in H, W the student map is bilinearly resized to the
    teacher's size; channel numbers must agree.

    After pruning removes student channels physically, the distiller gives
    the teacher's map restricted to the kept channels (see
    :meth:`CPDDistiller.follow_student_shrink`): the sum runs over the
    N·C' kept channels and is divided by N·C'. The gated student's loss
    divided by N·C and also counted the removed channels (a constant zero
    map against the teacher's, independent of the student), so the shrunk
    loss is the gated one recomputed on the kept channels only.

    Args:
        tau (float): temperature. Defaults to 1.0.
        loss_weight (float): weight of the loss. Defaults to 1.0 (mmrazor's
            CWD configs for PSPNet on Cityscapes use ``tau=1,
            loss_weight=3``; so does the ``'cwd'`` preset).
    """

    requires_labels = False

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f'`tau` must be > 0, but got {tau}')
        self.tau = tau
        self.loss_weight = loss_weight

    def forward(self,
                preds_S: Tensor,
                preds_T: Tensor,
                gt: Optional[Tensor] = None) -> Tensor:
        """Compute the loss.

        Args:
            preds_S (Tensor): student map (N, C, H, W).
            preds_T (Tensor): teacher map (N, C, H', W'); detached here.
            gt: unused (accepted so every loss has the same signature).
        """
        check_pair('ChannelWiseDivergence', preds_S, preds_T, ndims=(4, ))
        preds_T = preds_T.detach()
        preds_S = resize_to(preds_S, preds_T.shape[-2:])
        n, c = preds_T.shape[:2]
        log_p_s = F.log_softmax(preds_S.flatten(2) / self.tau, dim=2)
        log_p_t = F.log_softmax(preds_T.flatten(2) / self.tau, dim=2)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
        return self.loss_weight * self.tau**2 * kl / (n * c)
