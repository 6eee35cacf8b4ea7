"""Typed records that the tracer collects and gates, cost and surgery read.

Atoms are int64 arrays (see :mod:`cpd_mm.comb.space`); ``-1`` is "no
channel".  Module records (one per traced module that a handler owns) are
defined next to their handler in :mod:`cpd_mm.comb.handlers`; the records
here are the ones that aten-level rules and the tracer itself produce.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np


@dataclass
class Producer:
    """A stop op's output space: ``atoms`` are its output channels."""
    name: str
    atoms: np.ndarray
    numel_per_channel: int  # activation elements per channel (B=1)


@dataclass
class Channelwise:
    """A member that keeps channels in place (norm, depthwise conv)."""
    name: str
    atoms: np.ndarray


@dataclass
class Passenger:
    """A parameter or buffer indexed by channels along ``axis``."""
    name: str
    axis: int
    atoms: np.ndarray


@dataclass
class GateSite:
    """A module output (call ``call`` of ``module``) multiplied by the mask
    in the gated model; ``ids`` has the output's rank."""
    module: str
    call: int
    ids: np.ndarray
    users: List[str] = field(default_factory=list)


@dataclass
class NormSite:
    """A layer/group normalisation op whose statistics run over channels:
    the gated model normalises over active channels only.

    ``module`` is the innermost module that ran the op, ``call`` its call
    index and ``index`` the op's position among the norm ops of that call.
    ``atoms`` are the channels along ``axis`` of the op's input (negative
    for ``layer_norm``, counted from the end; 1 for ``group_norm``).
    """
    kind: str  # 'layer_norm' or 'group_norm'
    module: str
    call: int
    index: int
    atoms: np.ndarray
    axis: int


@dataclass
class AttentionScale:
    """``scaled_dot_product_attention`` without an explicit scale: it derives
    ``1/sqrt(head_dim)`` from q, so surgery folds the original scale into
    q's producer when head dims shrink."""
    module: str
    producer: Optional[str]
    q_ids: np.ndarray
    head_dim: int


@dataclass
class AttentionCore:
    """One ``scaled_dot_product_attention`` call inside ``module`` (its
    ``call``-th): per-head q/k and v channels (one head's atoms each)."""
    module: str
    call: int
    heads: int
    qk: np.ndarray
    v: np.ndarray


@dataclass
class ViewSize:
    """A reshape inside ``module`` whose target size on the channel axis
    is ``size``; module attributes equal to it may be shape arguments."""
    module: str
    size: int
    atoms: np.ndarray


@dataclass
class SplitSizes:
    """A split of the channel axis into unequal parts inside ``module``;
    a module attribute equal to ``sizes`` may be the split's argument."""
    module: str
    sizes: List[int]
    parts: List[np.ndarray]


@dataclass
class Frozen:
    """Atoms that must never be pruned, and why."""
    atoms: np.ndarray
    reason: str
