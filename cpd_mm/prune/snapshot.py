"""Physically pruned checkpoints written during and after a pruning run."""
import copy
import os.path as osp

import torch
from mmengine.dist import is_main_process
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

from ..comb import prune_model
from ..comb.verify import model_outputs
from .plan import PLAN_META_KEY, make_plan


def save_pruned(runner, student, comb, gates, kept, filename, meta=None,
                tol=1e-4):
    """Prune a copy of the gated ``student`` to ``kept``, check that it
    computes what the gated model computes on comb's example input, and
    write it with its plan in ``meta['cpd_plan']``. Returns the path."""
    plan = make_plan(comb, kept, student)
    was_training = student.training
    student.eval()
    x = torch.randn(*comb.input_shape,
                    generator=torch.Generator().manual_seed(0))
    p = next(iter(student.parameters()))
    x = x.to(p.device)
    try:
        with torch.no_grad():
            gated = model_outputs(student, x, None)
        with gates.detached():
            small = prune_model(copy.deepcopy(student), comb, kept)
        with torch.no_grad():
            pruned = model_outputs(small, x, None)
    finally:
        student.train(was_training)
    diff = max((float((a - b).abs().max()) /
                max(float(a.abs().max()), 1e-12)
                for a, b in zip(gated, pruned)), default=0.0)
    if diff > tol:
        runner.logger.warning(
            f'CPD: the pruned model differs from the gated one by {diff:.2e} '
            '(relative) on the example input; please report this model')
    path = osp.join(runner.work_dir, filename)
    if is_main_process():
        meta = dict(meta or {})
        meta.update({PLAN_META_KEY: plan, 'iter': runner.iter,
                     'params': int(sum(q.numel() for q in small.parameters())),
                     'max_rel_diff_gated_vs_pruned': diff,
                     'cfg': runner.cfg.pretty_text})
        save_checkpoint({'state_dict': weights_to_cpu(small.state_dict()),
                         'meta': meta}, path)
        runner.logger.info(f'CPD: pruned checkpoint saved to {path} '
                           f'({meta["params"] / 1e6:.3f} M params; gated vs '
                           f'pruned {diff:.1e})')
    return path
