"""Coupled channel groups: the result of combing a model.

A *channel* is an equivalence class of atoms, numbered globally from 0 to
``CombResult.num_channels - 1``.  A :class:`ChannelGroup` is the
set of channels created by the same stop ops (producers whose outputs meet at
coupling ops: a residual stream is one group).  Its members are the producers,
the consumers reading it, channel-wise layers (norms, depthwise convs) and
passengers (parameters indexed by the same channels).
"""
from collections import OrderedDict, defaultdict
from typing import Dict, List, Optional, Tuple

import numpy as np

from .handlers import op_handlers
from .space import UnionFind, along, channel_axis


class ChannelGroup:
    """One coupled group.

    Attributes:
        name (str): stable id, the first producer's module name.
        channels (np.ndarray): global channel ids, one per group channel.
        frozen (np.ndarray): bool per channel, never pruned.
        reasons (list[str]): why channels are frozen.
        producers, consumers, channelwise, passengers (list[str]): members.
        granularity (str): what a channel spans (conv groups, heads ...).
        numel_per_channel (int): activation elements per channel summed over
            producers (for B=1 at the traced size): the memory cost unit.
    """

    def __init__(self, name: str, channels: np.ndarray):
        self.name = name
        self.channels = channels
        self.frozen = np.zeros(len(channels), dtype=bool)
        self.reasons: List[str] = []
        self.producers: List[str] = []
        self.consumers: List[str] = []
        self.channelwise: List[str] = []
        self.passengers: List[str] = []
        self.granularity = 'channel'
        self.numel_per_channel = 0

    @property
    def size(self) -> int:
        return len(self.channels)

    @property
    def prunable(self) -> bool:
        return int((~self.frozen).sum()) > 1

    def __repr__(self):
        return (f'ChannelGroup({self.name!r}, size={self.size}, '
                f'frozen={int(self.frozen.sum())}, '
                f'producers={len(self.producers)}, '
                f'consumers={len(self.consumers)})')


class CombResult:
    """Groups of a traced model plus what gating, cost and surgery need.

    Attributes:
        num_channels (int): channels found (equivalence classes of atoms).
        groups (list[ChannelGroup]): coupled groups, in trace order.
        frozen_channels (np.ndarray): bool per channel, never pruned.
        records (dict): module name -> the handler's record.
        op_records (dict): op handler key -> its records, in trace order.
        sites, views, passengers, producers,
            channelwise: the tracer's typed records.
        unhandled_ops (dict): aten op name -> calls without a channel rule
            (their channels are frozen).
        verification: what self-verification found, if it ran.
    """

    def __init__(self, tracer, input_shape):
        self.input_shape = list(input_shape)
        uf: UnionFind = tracer.uf
        n_atoms = len(uf.parent)
        roots = uf.find(np.arange(n_atoms))
        _, self.channel_of_atom = np.unique(roots, return_inverse=True)
        self.num_channels = int(self.channel_of_atom.max() + 1) \
            if n_atoms else 0
        self.records = tracer.records
        self.sites = tracer.sites
        self.op_records = dict(tracer.op_records)
        self.views = tracer.views
        self.split_sizes = tracer.split_sizes
        self.unhandled_ops = dict(tracer.unhandled_ops)
        self.passengers = tracer.passengers
        self.producers = tracer.producers
        self.channelwise = tracer.channelwise
        self._io = dict(tracer.io)  # see io_channels()
        self.uncalled: List[str] = []
        # a pass through the model starts with this module (called once per
        # pass in the trace): gates count module calls from there
        first = tracer.first_module
        self.first_module = first if first and \
            tracer.calls.get(first) == 1 else None
        self.verification = None
        self._producer_channels = None  # see producer_channels()
        self._segments = None  # see producer_segments()
        self._build(tracer)

    # ------------------------------------------------------------ helpers
    def channels(self, atoms: np.ndarray) -> np.ndarray:
        """Channel id of every atom (-1 stays -1)."""
        atoms = np.asarray(atoms)
        out = np.full(atoms.shape, -1, dtype=np.int64)
        ok = atoms >= 0
        out[ok] = self.channel_of_atom[atoms[ok]]
        return out

    def keep_fn(self, kept: np.ndarray):
        """``keep(atoms) -> bool mask``: atoms without a channel are kept."""
        def keep(atoms):
            c = self.channels(atoms)
            return np.where(c >= 0, kept[np.maximum(c, 0)], True)
        return keep

    def io_channels(self, path: str, kind: str
                    ) -> List[List[Optional[Tuple[int, np.ndarray]]]]:
        """Channels of the tensors module ``path`` took or returned.

        Args:
            path: a module name (``''`` is the model itself).
            kind: ``'output'`` (the module's output: a tensor, or each
                element of a tuple/list) or ``'input'`` (its first positional
                argument, likewise).

        Returns:
            One list per call of the module in the trace (call order), one
            entry per tensor: ``(axis, channel_ids)``, the tensor's channel
            axis as the tracer knows it (:func:`~cpd_mm.comb.space.
            channel_axis`: dim 1 of an NCHW map, the last dim of (N, L, C)
            tokens) and the global channel id of every position along it
            (-1 where a position has no channel); or None where the tensor
            carries no channel. A module never called gives ``[]``.
        """
        if kind not in ('input', 'output'):
            raise ValueError(f"io_channels: kind must be 'input' or "
                             f"'output', but got {kind!r}")
        return [[None if e is None else self._axis_channels(*e) for e in call]
                for call in self._io.get((path, kind), [])]

    def _axis_channels(self, ids, shape):
        if not shape:
            return None
        axis = channel_axis(ids)
        if axis is None:
            # one channel throughout: any axis of size 1 indexes it alike
            ones = [a for a in range(1, len(shape)) if shape[a] == 1]
            axis = ones[0] if ones else len(shape) - 1
        return axis, self.channels(along(ids, axis, shape[axis]))

    # ------------------------------------------------------------ building
    def _build(self, tracer):
        frozen = np.zeros(self.num_channels, dtype=bool)
        frozen_by = []  # (channels, reason)
        for f in tracer.frozen:
            c = self.channels(f.atoms)
            frozen[c] = True
            frozen_by.append((np.unique(c), f.reason))
        self.frozen_channels = frozen
        # groups: unite channels appearing in the same producer output
        guf = UnionFind()
        guf.new(self.num_channels)
        for p in tracer.producers:
            c = self.channels(p.atoms)
            c = c[c >= 0]
            if c.size:
                guf.union(np.full(c.size, c[0]), c)
        groot = guf.find(np.arange(self.num_channels))
        # channel order inside a group: first appearance over the producers
        # in trace order (vectorised: this runs for every comb)
        per = [self.channels(p.atoms) for p in tracer.producers]
        owner = np.concatenate([np.full(len(c), i) for i, c in
                                enumerate(per)]) if per else np.zeros(0, int)
        flat = np.concatenate(per) if per else np.zeros(0, np.int64)
        ok = flat >= 0
        flat, owner = flat[ok], owner[ok]
        uniq, first = np.unique(flat, return_index=True)
        ordered = uniq[np.argsort(first, kind='stable')]
        first_sorted = np.sort(first)
        order: Dict[int, List[int]] = OrderedDict()
        first_producer = {}
        for c, f in zip(ordered.tolist(), first_sorted.tolist()):
            r = int(groot[c])
            if r not in order:
                order[r] = []
                first_producer[r] = tracer.producers[int(owner[f])].name
            order[r].append(c)
        self.groups: List[ChannelGroup] = []
        self.group_of_channel = np.full(self.num_channels, -1, np.int64)
        self.position_of_channel = np.full(self.num_channels, -1, np.int64)
        names = set()
        for r, chans in order.items():
            name = first_producer[r]
            while name in names:  # a module producing two groups
                name += "'"
            names.add(name)
            g = ChannelGroup(name, np.asarray(chans, dtype=np.int64))
            g.frozen = frozen[g.channels]
            self.group_of_channel[g.channels] = len(self.groups)
            self.position_of_channel[g.channels] = np.arange(len(chans))
            self.groups.append(g)
        reasons = defaultdict(set)
        for chans, reason in frozen_by:
            for gi in np.unique(self.group_of_channel[chans]):
                reasons[int(gi)].add(reason)
        for gi, g in enumerate(self.groups):
            g.reasons = sorted(reasons.get(gi, ()))
        # members for reports and importance
        for p in tracer.producers:
            for gi in self._groups_of(p.atoms):
                g = self.groups[gi]
                g.producers.append(p.name)
                g.numel_per_channel += p.numel_per_channel
                c = self.channels(p.atoms)
                n = len(c) // max(len(np.unique(c[c >= 0])), 1)
                if n > 1 and g.granularity == 'channel':
                    # a channel spans the same position of every conv group
                    g.granularity = f'uniform over {n} conv groups/heads'
        for name, rec in self.records.items():
            ins = getattr(rec, 'inputs', None)
            if ins is not None and not getattr(rec, 'depthwise', False):
                for gi in self._groups_of(ins):
                    self.groups[gi].consumers.append(name)
        for cw in self.channelwise:
            for gi in self._groups_of(cw.atoms):
                if cw.name not in self.groups[gi].channelwise:
                    self.groups[gi].channelwise.append(cw.name)
        for ps in self.passengers:
            for gi in self._groups_of(ps.atoms):
                if ps.name not in self.groups[gi].passengers:
                    self.groups[gi].passengers.append(ps.name)
        for h in op_handlers():
            h.annotate_groups(self, self.op_records.get(h.key, []))

    def _groups_of(self, atoms):
        c = self.channels(atoms)
        c = c[c >= 0]
        g = np.unique(self.group_of_channel[c])
        return [int(x) for x in g if x >= 0]

    # ------------------------------------------------------------ queries
    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f'no channel group named {name!r}')

    @property
    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def freeze_group(self, group: ChannelGroup, reason: str) -> None:
        """Freeze every channel of ``group`` (e.g. it failed verification)."""
        group.frozen[:] = True
        if reason not in group.reasons:
            group.reasons.append(reason)
        self.frozen_channels[group.channels] = True

    def frozen_reasons(self) -> Dict[str, int]:
        """Reason -> number of frozen channels (for reports)."""
        out = defaultdict(int)
        for g in self.groups:
            for r in g.reasons:
                out[r] += int(g.frozen.sum())
        return dict(out)

    def producer_channels(self) -> List[np.ndarray]:
        """The channels each producing module outputs, one array per module
        (a module called several times, such as a head shared across
        levels, once). A physically pruned producer keeps at least one:
        a conv or linear with no outputs cannot be built."""
        found = self._producer_channels
        if found is None:
            per = {}
            for p in self.producers:
                c = self.channels(p.atoms).ravel()
                per.setdefault(p.name, []).append(c[c >= 0])
            found = [np.unique(np.concatenate(v)) for v in per.values()]
            found = self._producer_channels = [c for c in found if c.size]
        return found

    def producer_segments(self) -> List[List[List[np.ndarray]]]:
        """Per group (in :attr:`groups` order), its channels split by the
        producing modules that output them, for width rules per producer.

        A *segment* is the set of a group's channels output by the same set
        of producers: a concat group has one per branch (mmdet's CSPLayer:
        ``main_conv`` and ``short_conv``); a residual group, whose producers
        all output every channel, is one. Every producer's outputs are a
        union of segments. Segments that one producer outputs together
        (the channel attention after that concat) are listed together:
        a group is a list of such segment sets, each a list of segments
        (channel arrays, in group order)."""
        found = getattr(self, '_segments', None)
        if found is None:
            # refine a partition of the channels by each producer's outputs
            label = np.zeros(self.num_channels, dtype=np.int64)
            nxt = 1
            for c in self.producer_channels():
                _, inv = np.unique(label[c], return_inverse=True)
                label[c] = nxt + inv
                nxt += int(inv.max()) + 1
            joined = UnionFind()
            joined.new(nxt)
            for c in self.producer_channels():
                labels = np.unique(label[c])
                joined.union(np.full(labels.size - 1, labels[0]), labels[1:])
            found = []
            for g in self.groups:
                lab = label[g.channels]
                sets = OrderedDict()
                for k in lab[np.sort(np.unique(lab, return_index=True)[1])]:
                    sets.setdefault(int(joined.find(k)), []).append(
                        g.channels[lab == k])
                found.append(list(sets.values()))
            self._segments = found
        return found

    def one_per_producer(self, kept: np.ndarray,
                         preference: np.ndarray) -> np.ndarray:
        """Channels to keep so that no producer loses all of its outputs:
        for every producer whose channels are all removed in ``kept`` and
        none frozen, the one with the highest ``preference``. Returns a
        bool mask over the channels."""
        keep = np.zeros(self.num_channels, dtype=bool)
        for c in self.producer_channels():
            if kept[c].any() or keep[c].any() or \
                    self.frozen_channels[c].any():
                continue
            keep[c[np.argmax(preference[c])]] = True
        return keep

    def kept_from_plan(self, plan: dict) -> np.ndarray:
        """Keep-mask over channels from a plan
        ``{'groups': {name: {'kept': [...]}}}``."""
        kept = np.ones(self.num_channels, dtype=bool)
        for gname, entry in plan.get('groups', {}).items():
            g = self.group(gname)
            if int(entry.get('num_channels', g.size)) != g.size:
                raise ValueError(
                    f'plan group {gname!r} has {entry["num_channels"]} '
                    f'channels but the model has {g.size}')
            keep = np.zeros(g.size, dtype=bool)
            idx = np.asarray(entry['kept'], dtype=np.int64)
            if idx.size == 0 or idx.min() < 0 or idx.max() >= g.size:
                raise ValueError(f'plan group {gname!r}: kept indices must '
                                 f'be in [0, {g.size}) and non-empty')
            keep[idx] = True
            if (~keep & g.frozen).any():
                raise ValueError(f'plan group {gname!r} removes frozen '
                                 'channels')
            kept[g.channels] = keep
        return kept

    def plan_from_kept(self, kept: np.ndarray,
                       meta: Optional[dict] = None) -> dict:
        groups = {}
        for g in self.groups:
            k = kept[g.channels]
            if not k.all():
                groups[g.name] = dict(num_channels=int(g.size),
                                      kept=[int(i) for i in np.nonzero(k)[0]])
        plan = dict(format='cpd_mm.plan/v1', input_shape=self.input_shape,
                    groups=groups)
        if meta:
            plan.update(meta)
        return plan
