"""The pruning hook under DDP (two gloo processes): a resumed run masks what
an uninterrupted one masks. (Every rank freezing the same groups: see
test_prune_hook.test_ddp_ranks_mask_the_same_channels.)"""
import os.path as osp

import numpy as np
import torch

from dist_utils import run_distributed
from test_prune_hook import CPDPruningHook, Interrupt, InterruptAt, make_runner

# pruning steps at iterations 3, 6, 9 and 12, each shrinking the student;
# the checkpoint of iteration 5 holds the shrunk student and two
# iterations' scores of the interval that ends at 6
SCHEDULE = dict(importance='hessian', interval=3, begin_iter=0, end_iter=12,
                launcher='pytorch')


def _hook(runner):
    return [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]


def _full_and_resumed(rank, work_dir):
    from mmengine.dist import barrier
    full = make_runner(osp.join(work_dir, 'full'), 14, **SCHEDULE)
    full.train()
    part = osp.join(work_dir, 'part')  # one folder: rank 0 writes, all read
    runner = make_runner(part, 14, **SCHEDULE)
    runner._hooks.append(InterruptAt(5))  # after the checkpoint of iter 5
    try:
        runner.train()
    except Interrupt:
        pass
    barrier()  # rank 0 has written iter_5.pth
    resumed = make_runner(part, 14, resume=True, **SCHEDULE)
    resumed.train()
    return dict(full=_hook(full).kept, resumed=_hook(resumed).kept,
                resumed_from=resumed.iter)


def test_ddp_resume_reproduces_the_masks_of_an_uninterrupted_run(tmp_path):
    """The ranks see different images, so their scores differ: the
    checkpoint must hold the sum over ranks, counted once on resume."""
    r0, r1 = run_distributed(_full_and_resumed, str(tmp_path), world_size=2,
                             timeout=300)
    ckpt = torch.load(tmp_path / 'part' / 'iter_5.pth', weights_only=False)
    assert ckpt['cpd_pruning']['physical']  # resumed a shrunk student
    assert (~r0['full']).any()
    for r in (r0, r1):
        assert r['resumed_from'] == 14
        np.testing.assert_array_equal(r['resumed'], r['full'])
    np.testing.assert_array_equal(r0['full'], r1['full'])
