"""Shape checks and resizing shared by the distillation losses."""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor


def check_pair(name: str, preds_S: Tensor, preds_T: Tensor,
               ndims: Tuple[int, ...], same_channels: bool = True) -> None:
    """Raise a ``ValueError`` naming both shapes if the pair is unusable.

    Args:
        name (str): loss name used in the message.
        preds_S (Tensor): student tensor.
        preds_T (Tensor): teacher tensor.
        ndims (tuple[int]): accepted numbers of dimensions.
        same_channels (bool): whether dim 1 must agree.
    """
    for role, t in (('student', preds_S), ('teacher', preds_T)):
        if not isinstance(t, Tensor):
            raise ValueError(f'{name}: the {role} input must be a Tensor, '
                             f'but got {type(t).__name__}')
        if t.dim() not in ndims:
            raise ValueError(f'{name}: expects {" or ".join(map(str, ndims))}'
                             f'-d inputs, but the {role} input has shape '
                             f'{tuple(t.shape)}')
    if preds_S.dim() != preds_T.dim() or preds_S.shape[0] != preds_T.shape[0]:
        raise ValueError(f'{name}: student {tuple(preds_S.shape)} and teacher '
                         f'{tuple(preds_T.shape)} differ in rank or batch')
    if same_channels and preds_S.shape[1] != preds_T.shape[1]:
        raise ValueError(f'{name}: student {tuple(preds_S.shape)} and teacher '
                         f'{tuple(preds_T.shape)} have different channel '
                         'numbers; distil matching tensors (e.g. logits) or '
                         'add a projection')


def resize_to(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinearly resize a (N, C, H, W) map to ``size`` (no-op if equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


def resize_labels(labels: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest-resize a (N, H, W) or (N, 1, H, W) label map to ``size``.

    Nearest neighbour keeps labels (and ``ignore_index``) exact, which
    bilinear interpolation of class ids would not.
    """
    if labels.dim() == 4:
        labels = labels.squeeze(1)
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    out = F.interpolate(labels[:, None].float(), size=size, mode='nearest')
    return out[:, 0].long()


def zero_like_graph(x: Tensor) -> Tensor:
    """A zero loss that still depends on ``x`` (keeps DDP and logs happy)."""
    return x.sum() * 0.0
