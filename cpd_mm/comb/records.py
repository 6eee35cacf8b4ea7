"""Typed records that the tracer collects and gates, cost and surgery read.

Atoms are int64 arrays (see :mod:`cpd_mm.comb.space`); ``-1`` is "no
channel".  Records of a construct (a module handler's record per traced
module, an op handler's records per op call) are defined next to their
handler in :mod:`cpd_mm.comb.handlers`; the records here are the ones that
generic aten rules and the tracer itself produce.
"""
from dataclasses import dataclass, field
from typing import List

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
