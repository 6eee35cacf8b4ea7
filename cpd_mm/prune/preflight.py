"""What a :class:`~cpd_mm.prune.PruningSession` settles before training:
the groups every rank freezes, the latency table, the report of what comb
found, and whether the target can be reached at all: functions of the
session, called once by :meth:`PruningSession.setup`."""
import numpy as np
from mmengine.dist import (all_gather_object, broadcast_object_list,
                           is_distributed, is_main_process)

from .schedule import select_channels


def report(session):
    n = len(session.base.prunable_groups)
    session._info(
        f'CPD: combed {type(session.student).__name__}: '
        f'{len(session.base.groups)} channel groups ({n} prunable), '
        f'{session.base.num_channels} channels, '
        f'{int(session.base.frozen_channels.sum())} frozen; '
        f'{session.cost.total_params / 1e6:.3f} M params, target sparsity '
        f'{session.target_sparsity:.0%} of {session.target}; shrink='
        f'{session.shrink!r}')
    if session.base.verification is not None:
        session._info(f'CPD: verification: {session.base.verification}')
    for g in session.base.groups:
        if g.frozen.any() and g.size > 1:
            session._info(f'CPD: group {g.name} ({g.size} channels): '
                          f'{int(g.frozen.sum())} frozen: '
                          + '; '.join(g.reasons))
    if session.base.unhandled_ops:
        session._warn('CPD: aten ops without a channel rule (their '
                      'channels are frozen): ' + ', '.join(
                       f'{k} x{v}' for k, v in
                       sorted(session.base.unhandled_ops.items())))
    if n == 0:
        raise RuntimeError(
            'CPD: no prunable channel group was found (every group is '
            'frozen, see the reasons above); run tools/check_pruning.py '
            'on this config')
    names = [g.name for g in session.base.prunable_groups
             if session.unscored[g.channels].any()]
    if names:
        session._warn(
            f'CPD: {len(names)} group(s) are not pruned: their layers\' '
            'outputs do not require grad (frozen parameters, e.g. '
            'frozen_stages), so no gate gradient exists: '
            + ', '.join(names[:8]) + (' ...' if len(names) > 8 else ''))


def check_reachable(session):
    """Refuse, before training, a target that the floors forbid: the
    selection itself, run to an empty budget, gives the smallest
    structure that the floors, frozen groups and unscored channels
    leave (for 'latency': as the table predicts)."""
    total = session.cost.total(session.target)
    smallest = select_channels(
        np.zeros(session.base.num_channels), session.kept, session.base,
        session.cost, 0.0, session.target, session.min_channels,
        session.round_to,
        protected=session.unscored, max_removal=session.max_removal,
        ranking='score')
    reachable = 1.0 - session.cost.evaluate(smallest, session.target) / total
    session._info(f'CPD: the floors allow a sparsity of {reachable:.3f} of '
                  f'{session.target} at most')
    if reachable < session.target_sparsity - 1e-3:
        what = ('the latency table (measured on '
                f'{session.cost.table.provider} at '
                f'{session.latency["shape"]}) '
                'predicts that the smallest structure keeps '
                if session.target == 'latency' else
                'the smallest structure keeps ')
        raise ValueError(
            f'CPDPruningHook: target_sparsity={session.target_sparsity} of '
            f'{session.target} cannot be reached: with max_removal='
            f'{session.max_removal}, min_channels={session.min_channels}, '
            f'round_to={session.round_to}, the frozen groups and '
            f'{int(session.unscored.sum())} channel(s) of layers that do '
            'not train, ' + what +
            f'{1 - reachable:.1%} of it (sparsity {reachable:.3f} at '
            'most). Lower target_sparsity, raise max_removal, or lower '
            'round_to' + ('; a latency measured at a small latency_shape'
                          ' is mostly fixed overhead: use the deployment '
                          'input size' if session.target == 'latency'
                          else '') + '.')


def latency_table(session, student):
    """Rank 0 measures (or loads from its cache) the latency table of
    the bare student, before gates change its graph; every rank gets
    rank 0's."""
    from ..deploy.latency_table import LatencyTable
    lat, data = session.latency, [None]
    if is_main_process():
        table = LatencyTable.build(
            student, lat['shape'], providers=lat['providers'],
            threads=lat['threads'], logger=session.log,
            precision=lat['precision'])
        data = [table.data]
        if session.round_to % max(table.channel_block, 1):
            session._warn(
                f'CPD: round_to={session.round_to} is not a multiple of '
                f'{table.channel_block}, the channel block of '
                f'{table.provider} on this CPU: widths off that block '
                'run slower than the latency table predicts')
    if is_distributed():
        broadcast_object_list(data, src=0)
    table = LatencyTable(data[0])
    session._info(f'CPD: latency table: {table.full_ms:.2f} ms measured on '
                  f'{table.provider} at {lat["shape"]} in '
                  f'{table.precision.upper()}')
    return table


def sync_verification(session, state):
    """Every rank freezes the union of what each rank's verification
    (or the resumed run's) froze: a group that failed its check
    anywhere is not trusted anywhere."""
    frozen = frozen_here = dict(state.get('verified_frozen', {})) \
        if state else dict(session.base.verification.frozen)
    if is_distributed():  # the same dict, in rank order, everywhere
        frozen = {}
        for rank, found in enumerate(all_gather_object(frozen_here)):
            for name, reason in found.items():
                frozen.setdefault(name, reason if rank == 0 else
                                  f'{reason} (on rank {rank})')
    for name, reason in frozen.items():
        session.base.freeze_group(session.base.group(name), reason)
    session.verified_frozen = frozen
