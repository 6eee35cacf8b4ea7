"""Distillation that follows a student whose channels are removed mid-run.

When the pruning session physically removes masked channels from the
student, a distillation source of the student (a feature map, FPN levels,
embeddings) gets narrower while the teacher's keeps its full width. Each
distill item then goes one of three ways (see
:meth:`CPDDistiller.follow_student_shrink`):

* the loss owns a **connector** from the student's width (CIRKD's projection
  head): the loss implements ``shrink_student_channels(keep)`` and slices
  the connector's input alike; the teacher is untouched. Removed channels
  were zero in the gated student, so their connector columns contributed
  nothing: the loss value is unchanged.
* any other loss compares **channel c with channel c**: the teacher's source
  is indexed by the kept positions (absolute, in the original width) along
  the channel axis before the loss. The loss is then the gated student's
  loss *recomputed on the kept channels only*: a loss that averages over
  channels (CWD divides by N·C) now divides by N·C' with C' the kept width,
  and a softmax over channels (KL on features) normalises over the kept
  channels only. In the gated model a removed channel was a constant zero
  map: its terms did not depend on the student, so the gradient of the new
  loss is that of the gated loss's kept-channel terms, rescaled by the
  change of the normaliser (C / C' for CWD).
* **logits** are never pruned (comb freezes model outputs); a mask that
  removes logit channels is an error.

The per-item state (absolute kept positions per level) is plain Python data,
not part of any ``state_dict``: on resume the runner rebuilds it by calling
``follow_student_shrink`` again with the plan's masks. Following replaces
what it changes and writes nothing in place (a connector gets new
parameters), as surgery on a structural copy requires.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .sources import LOGITS, resolve_source

BaseKeep = Callable[[str, str], List[List[Optional[np.ndarray]]]]


def base_keep_from_comb(comb, kept: np.ndarray) -> BaseKeep:
    """The ``base_keep`` function of :meth:`CPDDistiller.follow_student_shrink`
    for a student combed as ``comb`` and pruned to ``kept`` (bool per channel
    of ``comb``): per call and tensor of ``comb.io_channels(path, kind)``,
    the kept mask along the tensor's channel axis, or None where nothing of
    it is removed (positions without a channel are kept)."""
    kept = np.asarray(kept, dtype=bool)

    def base_keep(path: str, kind: str) -> List[List[Optional[np.ndarray]]]:
        out = []
        for call in comb.io_channels(path, kind):
            row = []
            for entry in call:
                mask = None
                if entry is not None:
                    ids = entry[1]
                    mask = np.where(ids >= 0, kept[np.maximum(ids, 0)], True)
                row.append(None if mask is None or mask.all() else mask)
            out.append(row)
        return out
    return base_keep


class ShrunkSource:
    """The channels still present in one student source, per level.

    A *level* is one tensor of the source as :func:`~cpd_mm.distill.sources.
    fetch` returns it (one tensor, the tensors of a tuple output, or one per
    call). ``masks[i]`` is the bool mask of level ``i`` over its channels in
    the original student (True: still present), or None (nothing removed).

    Args:
        source (str): the student source name (for messages).
        masks (list[np.ndarray | None]): absolute masks, one per level.
    """

    def __init__(self, source: str, masks: List[Optional[np.ndarray]]):
        self.source = source
        self.masks = masks
        self.connector = False  # the loss slices its own input instead
        self._index: Dict[tuple, Tensor] = {}  # (level, device) -> positions

    @property
    def removes(self) -> bool:
        return any(m is not None and not m.all() for m in self.masks)

    def relative_to(self, old: Optional['ShrunkSource']
                    ) -> List[Optional[np.ndarray]]:
        """Per level, the mask of the new channels among those ``old`` kept
        (None: nothing more removed). Raises if channels would come back."""
        olds = old.masks if old is not None else [None] * len(self.masks)
        if len(olds) != len(self.masks):
            raise ValueError(
                f"source '{self.source}': {len(self.masks)} levels now, but "
                f'{len(olds)} when it was last shrunk')
        rel = []
        for level, (o, n) in enumerate(zip(olds, self.masks)):
            if o is not None and n is None:
                n = np.ones_like(o)
            if n is None:
                rel.append(None)
                continue
            if o is None:
                o = np.ones_like(n)
            if o.shape != n.shape or (n & ~o).any():
                raise ValueError(
                    f"source '{self.source}', level {level}: the new mask "
                    f'({n.size} channels, {int(n.sum())} kept) keeps '
                    f'channels that were removed before ({o.size} channels, '
                    f'{int(o.sum())} kept); masks are absolute and can only '
                    'remove more')
            r = n[o]
            rel.append(None if r.all() else r)
        return rel

    def positions(self, level: int, device) -> Optional[Tensor]:
        """Kept positions of ``level`` as an index tensor on ``device``
        (cached: one host-to-device copy per level and device)."""
        mask = self.masks[level]
        if mask is None or mask.all():
            return None
        key = (level, str(device))
        if key not in self._index:
            self._index[key] = torch.as_tensor(
                np.flatnonzero(mask), dtype=torch.long, device=device)
        return self._index[key]

    def select_teacher(self, preds_S: Union[Tensor, Sequence[Tensor]],
                       preds_T: Union[Tensor, Sequence[Tensor]]
                       ) -> Union[Tensor, List[Tensor]]:
        """The teacher's source restricted to the student's kept channels,
        level by level."""
        single = isinstance(preds_T, Tensor)
        levels_S = [preds_S] if isinstance(preds_S, Tensor) else list(preds_S)
        levels_T = [preds_T] if single else list(preds_T)
        if len(levels_S) != len(levels_T):
            return preds_T  # the loss names the mismatch
        mask_of = list(range(len(self.masks)))  # level -> its mask
        if len(self.masks) != len(levels_T):
            if not all(_same(m, self.masks[0]) for m in self.masks):
                raise ValueError(
                    f"source '{self.source}': comb saw {len(self.masks)} "
                    f'tensors with different kept channels, the forward '
                    f'pass gave {len(levels_T)}; cannot tell which is which')
            mask_of = [0] * len(levels_T)  # one mask for every level
        out = []
        for level, (s, t) in enumerate(zip(levels_S, levels_T)):
            index = self.positions(mask_of[level], t.device)
            if index is None:
                out.append(t)
                continue
            axis = _channel_axis(s, t, self.masks[mask_of[level]],
                                 self.source, level)
            out.append(t.index_select(axis, index))
        return out[0] if single else out


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool((a == b).all())


def _channel_axis(s: Tensor, t: Tensor, mask: np.ndarray, source: str,
                  level: int) -> int:
    """The axis along which the student has the kept width and the teacher
    the original one (dim 1, the channel dim of every loss here, first)."""
    kept, full = int(mask.sum()), mask.size
    axes = [a for a in range(1, min(s.dim(), t.dim()))
            if s.shape[a] == kept and t.shape[a] == full]
    if 1 in axes:
        return 1
    if len(axes) == 1:
        return axes[0]
    raise ValueError(
        f"source '{source}', level {level}: student {tuple(s.shape)}, "
        f'teacher {tuple(t.shape)}: expected one axis where the student has '
        f'the {kept} kept channels and the teacher the original {full}. '
        'Channel-by-channel losses need a teacher at the student\'s original '
        'width, and follow_student_shrink must be called after every shrink '
        'of the student (on the distiller built with the unpruned student)')


def source_masks(paths, base_keep: BaseKeep) -> List[Optional[np.ndarray]]:
    """Absolute masks of a source, one per level: ``base_keep`` per module
    path and call, flattened (calls, then tensors), in path order."""
    masks = []
    for path, kind in paths:
        calls = base_keep(path, kind)
        if calls is None:
            continue
        for call in calls:
            for m in call:
                masks.append(None if m is None else
                             np.asarray(m, dtype=bool).ravel())
    return masks


def follow_item(student: nn.Module, spec: dict, loss_fn: nn.Module,
                base_keep: BaseKeep, old: Optional[ShrunkSource]
                ) -> Tuple[Optional[ShrunkSource], Optional[np.ndarray]]:
    """Check one distill item (``spec``: its sources and name) against the
    masks of ``base_keep``; ``old`` is its state after the last shrink.

    Returns its new state (None while its source lost nothing) and, for a
    loss with a connector, the keep mask to pass to its
    ``shrink_student_channels`` (None when nothing more was removed). Changes
    nothing itself, so that a bad mask leaves every item as it was. See
    :meth:`CPDDistiller.follow_student_shrink`."""
    source = spec['student']
    paths = resolve_source(student, source)
    new = ShrunkSource(source, source_masks(paths, base_keep))
    relative = new.relative_to(old)
    if not new.removes:
        return None, None
    if source == LOGITS:
        raise ValueError(
            f"distill '{spec['name']}': the mask removes channels of the "
            f"student's logits ({', '.join(p for p, _ in paths)}); model "
            'outputs are never pruned (comb freezes them), so the mask does '
            "not come from this model's comb")
    new.connector = callable(getattr(loss_fn, 'shrink_student_channels',
                                     None))
    changed = [r for r in relative if r is not None]
    if not new.connector or not changed:
        return new, None
    if len(changed) != len(relative) or any(
            not np.array_equal(r, changed[0]) for r in changed):
        raise ValueError(
            f"distill '{spec['name']}': the levels of source '{source}' lost "
            f'different channels, but {type(loss_fn).__name__} has one '
            'connector for all of them')
    return new, changed[0]
