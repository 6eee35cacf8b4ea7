"""Distill: teacher–student training during pruning (DESIGN.md, "Distill").

Importing this package registers :class:`CPDDistiller` and the losses
(:class:`KLDivergence`, :class:`BinaryKLDivergence`,
:class:`ChannelWiseDivergence`, :class:`CIRKDLoss`)
in mmengine's root ``MODELS`` and the ``student://`` checkpoint scheme.
"""
from .checkpoint import (is_distill_state_dict, load_from_student,
                         student_state_dict)
from .distiller import CPDDistiller, build_teacher
from .losses import (BinaryKLDivergence, ChannelWiseDivergence, CIRKDLoss,
                     KLDivergence)
from .presets import DISTILL_TYPES, build_distill_cfg

__all__ = [
    'CPDDistiller', 'build_teacher', 'build_distill_cfg', 'DISTILL_TYPES',
    'KLDivergence', 'BinaryKLDivergence', 'ChannelWiseDivergence',
    'CIRKDLoss',
    'student_state_dict', 'is_distill_state_dict', 'load_from_student'
]
