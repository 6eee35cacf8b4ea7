"""Distillation losses, registered in mmengine's root ``MODELS``.

Every loss is called as ``loss(preds_S, preds_T, gt=None)``: student tensor,
teacher tensor (or lists of per-level tensors for losses with
``multi_level = True``), and an optional label map (N, H, W) that the
distiller passes for segmentation. It returns a scalar or a dict of named
scalars, already multiplied by its ``loss_weight``.
"""
from .binary_kl import BinaryKLDivergence
from .cirkd import CIRKDLoss
from .cwd import ChannelWiseDivergence
from .kl import KLDivergence

__all__ = ['KLDivergence', 'BinaryKLDivergence', 'ChannelWiseDivergence',
           'CIRKDLoss']
