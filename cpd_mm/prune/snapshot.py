"""Physically pruned checkpoints written during and after a pruning run.

Every file is checked before it is written: the pruned copy must compute
what the gated model computes (the equivalence invariant). A failed check
stops the run with the groups that differ; nothing is written under the
pruned file's name, and the gated model (full-size weights, masks in meta)
goes to ``<name>.FAILED_gated.pth`` so that the run is not lost.
"""
import contextlib
import copy
import os.path as osp

import torch
from mmengine.dist import broadcast_object_list, is_distributed, \
    is_main_process
from mmengine.runner.checkpoint import weights_to_cpu

from ..comb import prune_model
from ..comb.verify import failing_groups, model_outputs, relative_difference
from ..utils.checkpoint import save_checkpoint_atomic
from .plan import PLAN_META_KEY

GATED_PLAN_KEY = 'cpd_gated_plan'   # masks of a gated (unpruned) checkpoint


class PrunedCheckError(RuntimeError):
    """The physically pruned model does not compute what the gated model
    computes; ``groups`` maps each group that differs to the reason."""

    def __init__(self, message: str, groups: dict):
        super().__init__(message)
        self.groups = groups


def example_input(comb, like: torch.Tensor) -> torch.Tensor:
    """comb's example input (seed 0, on ``like``'s device): the same on
    every rank and run, the user's random stream left alone."""
    x = torch.randn(*comb.input_shape,
                    generator=torch.Generator().manual_seed(0))
    return x.to(like.device)


def _check(student, comb, gates, kept, tol):
    """``(small, diff, failed)``: the pruned copy (None if surgery raised),
    its largest relative difference to the gated student on the example
    input, and {group: reason} where the check fails. ``gates`` may be None
    where nothing is masked."""
    was_training = student.training
    student.eval()
    x = example_input(comb, next(iter(student.parameters())))
    small, diff, failed = None, None, {}
    detached = gates.detached() if gates is not None else \
        contextlib.nullcontext()
    try:
        with torch.no_grad():
            gated = model_outputs(student, x, None)
        with detached:
            try:
                small = prune_model(copy.deepcopy(student), comb, kept)
                with torch.no_grad():
                    pruned = model_outputs(small, x, None)
                diff, why = relative_difference(gated, pruned)
            except Exception as e:  # noqa: B902 (named in the report)
                why = f'surgery raised {type(e).__name__}: {e}'
            diff = float('inf') if diff is None else diff
            if diff > tol:  # {} if float64 shows float32 rounding
                failed = failing_groups(student, comb, kept, x, tol) or \
                    ({'(the whole plan)': why} if why else {})
    finally:
        student.train(was_training)
    return small, diff, failed


def _failure(path, diff, failed, gated_path):
    names = ', '.join(failed)
    lines = '\n'.join(f'  {g}: {why}' for g, why in failed.items())
    how = f'largest relative difference {diff:.2e} on the example input' \
        if diff < float('inf') else 'surgery failed or changed an output shape'
    return (f'CPD: the physically pruned model does not compute what the '
            f'gated model computes ({how}); the group(s) that differ: '
            f'{names}\n'
            f'{lines}\nNothing was written to {path}. The gated model '
            f'(full-size weights, its masks in meta[{GATED_PLAN_KEY!r}]) is '
            f'in {gated_path}. Please report this model; the hook\'s '
            f'exclude={[g for g in failed if not g.startswith("(")]} '
            '(each group is named after its first producing layer) prunes '
            'around these groups.')


def check_pruned(student, comb, gates, kept, plan, meta, path, log,
                 tol=1e-4, write=False):
    """Prune a copy of the gated ``student`` to ``kept`` (over ``comb``'s
    channels) and check that it computes what the gated model computes on
    comb's example input; with ``write``, save it to ``path`` with ``plan``
    in ``meta['cpd_plan']``. Returns the pruned copy on rank 0.

    Rank 0 checks and writes (atomically: a crash leaves no file under
    ``path``); every rank gets its verdict.

    Raises:
        PrunedCheckError: the check failed (on every rank). Nothing is
            written under ``path``; the gated student goes to
            ``<path stem>.FAILED_gated.pth``.
    """
    meta = dict(meta or {})
    verdict, small = [None], None
    if is_main_process():
        small, diff, failed = _check(student, comb, gates, kept, tol)
        if failed:
            gated_path = osp.splitext(path)[0] + '.FAILED_gated.pth'
            detached = gates.detached() if gates is not None else \
                contextlib.nullcontext()
            with detached:
                state = weights_to_cpu(student.state_dict())
            meta.update({GATED_PLAN_KEY: plan, 'cpd_failed_groups': failed,
                         'max_rel_diff_gated_vs_pruned': diff})
            save_checkpoint_atomic({'state_dict': state, 'meta': meta},
                                   gated_path)
            verdict = [(_failure(path, diff, failed, gated_path), failed)]
        elif write:
            params = int(sum(q.numel() for q in small.parameters()))
            meta.update({PLAN_META_KEY: plan, 'params': params,
                         'max_rel_diff_gated_vs_pruned': diff})
            save_checkpoint_atomic(
                {'state_dict': weights_to_cpu(small.state_dict()),
                 'meta': meta}, path)
            log(f'CPD: pruned checkpoint saved to {path} ({params / 1e6:.3f}'
                f' M params; gated vs pruned {diff:.1e})')
    if is_distributed():
        broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise PrunedCheckError(*verdict[0])
    return small
