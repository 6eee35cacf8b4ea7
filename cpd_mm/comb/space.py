"""Channel atoms, their union-find, and the per-tensor channel annotation.

Every channel created by a stop op (a conv or linear output channel) is an
**atom**, an integer.  Coupling ops *unite* atoms that must be removed
together; the equivalence classes are the prunable channels.

Each traced tensor carries a :class:`TensorInfo` whose ``ids`` array has the
tensor's rank; every axis is either of the tensor's size or 1 (broadcast), and
entry ``-1`` means "no channel" (image pixels, attention scores, constants).
Only one axis may vary by *class* (the channel axis): whenever several axes
vary, atoms that differ only along the non-last varying axes are united,
because surgery removes whole slices of a single axis (this is what turns a
reshape into ``(3, heads, head_dim)`` into uniform head-dim pruning, a grouped
conv into uniform per-group pruning, and ``chunk(2)`` into paired pruning).
"""
from typing import Dict, Optional, Tuple

import numpy as np


class UnionFind:
    """Vectorised union-find over non-negative integer atoms."""

    def __init__(self):
        self.parent = np.zeros(0, dtype=np.int64)

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate(
            [self.parent, np.arange(start, start + n, dtype=np.int64)])
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.int64)
        out = a.copy()
        valid = out >= 0
        cur = out[valid]
        while True:
            nxt = self.parent[cur]
            if np.array_equal(nxt, cur):
                break
            cur = nxt
        out[valid] = cur
        # path compression keeps later finds cheap
        if valid.any():
            self.parent[a[valid]] = cur
        return out

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        while a.size:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                return
            ra, rb = ra[diff], rb[diff]
            lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
            self.parent[hi] = lo  # conflicting writes resolve on next loop
            a, b = a[diff], b[diff]


class TensorInfo:
    """Channel annotation of one traced tensor.

    Attributes:
        ids: int64 array, rank of the tensor, atoms or -1 (see module doc).
        z: True if, in the gated model, removed channels of this tensor are
            guaranteed to be zero (needed wherever channels are summed).
        src: for tensors derived from parameters/buffers only by views and
            elementwise ops: ``{param_name: axis_map}``, ``axis_map[i]`` is the
            parameter axis behind tensor axis ``i`` (None if mixed).
        lin: name of the stop op whose output this tensor is a pure view of
            (reshape/permute only), used to fold attention scales.
        zero: the tensor is identically zero (``x * 0``, ``new_zeros``):
            adding it keeps removed channels at zero.
    """
    __slots__ = ('ids', 'z', 'src', 'lin', 'zero')

    def __init__(self, ids: np.ndarray, z: bool = True,
                 src: Optional[Dict[str, Tuple]] = None,
                 lin: Optional[str] = None, zero: bool = False):
        self.ids = ids
        self.z = z
        self.src = src or {}
        self.lin = lin
        self.zero = zero

    @property
    def has_ids(self) -> bool:
        return bool((self.ids >= 0).any())


def empty_ids(ndim: int) -> np.ndarray:
    return np.full((1, ) * ndim, -1, dtype=np.int64)


def collapse(ids: np.ndarray) -> np.ndarray:
    """Shrink every axis along which the array is constant to size 1."""
    for ax in range(ids.ndim):
        if ids.shape[ax] > 1:
            first = np.take(ids, [0], axis=ax)
            if (ids == first).all():
                ids = first
    return ids


def canonical(ids: np.ndarray, uf: UnionFind) -> np.ndarray:
    """Collapse constant axes and unite atoms across non-channel axes."""
    ids = collapse(ids)
    varying = [ax for ax in range(ids.ndim) if ids.shape[ax] > 1]
    if len(varying) > 1:
        ch = varying[-1]
        moved = np.moveaxis(ids, ch, -1).reshape(-1, ids.shape[ch])
        ref = moved[0]
        for row in moved[1:]:
            # rows that are -1 (no channel) stay -1; others are tied by index
            uf.union(ref, row)
            ref = np.where(ref >= 0, ref, row)
    return ids


def channel_axis(ids: np.ndarray) -> Optional[int]:
    """The last axis along which ``ids`` varies (None if constant)."""
    varying = [ax for ax in range(ids.ndim) if ids.shape[ax] > 1]
    return varying[-1] if varying else None


def along(ids: np.ndarray, axis: int, size: int) -> np.ndarray:
    """1-D atoms along ``axis`` (length ``size``), taking the first entry of
    every other axis (atoms across other axes are united by ``canonical``)."""
    axis = axis % ids.ndim
    idx = tuple(slice(None) if a == axis else 0 for a in range(ids.ndim))
    line = ids[idx]
    if line.shape[0] == 1 and size != 1:
        line = np.repeat(line, size)
    return line.astype(np.int64)


def varies_other_than(ids: np.ndarray, axis: int) -> bool:
    axis = axis % ids.ndim
    return any(ids.shape[a] > 1 for a in range(ids.ndim) if a != axis)
