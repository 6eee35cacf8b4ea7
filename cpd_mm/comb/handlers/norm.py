"""Normalisation modules: traced through their own aten ops (see
:mod:`cpd_mm.comb.rules.norm`), so subclasses with their own forward (a
channel-first LayerNorm that permutes NCHW) follow the same rule. The
handler keeps the module's size attributes in step with its parameters."""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch.nn as nn

from .base import ModuleHandler, ModuleRecord, register_handler


@dataclass
class NormRecord(ModuleRecord):
    axis: int = 0             # channel axis of the affine parameters
    per_channel_groups: bool = False  # GroupNorm with one channel a group
    channels: Optional[np.ndarray] = None
    atom_fields = ('channels', )


@register_handler
class NormHandler(ModuleHandler):
    """BatchNorm (any dimension, SyncBatchNorm), LayerNorm, GroupNorm."""
    module_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                    nn.GroupNorm)
    transparent = True

    def site_parameters(self, m, rec):
        return [('weight', rec.axis), ('bias', rec.axis)]

    def prune(self, m, rec, keep):
        # the affine parameters and running statistics are passengers of
        # the norm op: sliced with the other passengers
        n = int(keep(rec.channels).sum())
        if isinstance(m, nn.LayerNorm):
            shape = list(m.normalized_shape)
            shape[rec.axis] = n
            m.normalized_shape = tuple(shape)
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = n
            if rec.per_channel_groups:
                m.num_groups = n
        else:
            m.num_features = n
        return None
