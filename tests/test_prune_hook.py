"""CPDPruningHook inside an mmengine Runner: schedule, checkpoints, resume,
argument validation and DDP agreement."""
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.hooks import Hook
from mmengine.registry import DATASETS, HOOKS, MODELS
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cpd_mm  # noqa: F401
from cpd_mm.prune import CPDPruningHook, CPDRunner, apply_plan


@MODELS.register_module(force=True)
class HookToyNet(BaseModel):

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, inputs, labels=None, mode='tensor'):
        x = F.relu(self.bn1(self.conv1(inputs)))
        y = F.relu(self.bn2(self.conv2(x)))
        y = y + self.conv3(y)
        out = self.fc(y.mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(out, labels))
        return out


@DATASETS.register_module(force=True)
class HookToyData(Dataset):

    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (n, ), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def make_runner(work_dir, max_iters, resume=False, launcher='none', **hook):
    hook_cfg = dict(type='CPDPruningHook', target_sparsity=0.5, interval=2,
                    begin_iter=2, end_iter=10, input_shape=(1, 3, 8, 8))
    hook_cfg.update(hook)
    runner_type = hook_cfg.pop('runner_type', CPDRunner)
    return runner_type(
        model=dict(type='HookToyNet'),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=dict(type='HookToyData'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=4, num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[hook_cfg],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=5, by_epoch=False)),
        resume=resume,
        launcher=launcher,
        randomness=dict(seed=0),
        default_scope='mmengine')


def kept_of(work_dir):
    with open(osp.join(work_dir, 'cpd_plan.json')) as f:
        return json.load(f)


@pytest.mark.parametrize('kind', ['hessian', 'fisher', 'hessian_fd',
                                  'taylor', 'l1', 'random'])
def test_hook_reaches_target_and_writes_pruned_checkpoint(tmp_path, kind):
    runner = make_runner(str(tmp_path), 14, importance=kind)
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    assert abs(hook.sparsity() - 0.5) < 0.05
    assert hook.steps >= 2
    assert runner.message_hub.get_scalar('train/cpd_sparsity').current() > 0.45
    assert osp.exists(osp.join(tmp_path, 'cpd_kept_channels.png'))
    ckpt = torch.load(osp.join(tmp_path, 'pruned_final.pth'))
    plan = ckpt['meta']['cpd_plan']
    assert json.loads(json.dumps(plan)) == plan  # plain data
    # rebuild from the original model: apply plan, load, compare to gated
    model = HookToyNet()
    apply_plan(model, plan)
    model.load_state_dict(ckpt['state_dict'])
    model.eval()
    gated = runner.model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a, b = gated(x), model(x)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < \
        0.55 * sum(p.numel() for p in HookToyNet().parameters())


class Interrupt(Exception):
    pass


@HOOKS.register_module(force=True)
class InterruptAt(Hook):
    """Stops training like a killed job, after the checkpoint of ``at``."""
    priority = 'LOWEST'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.at:
            raise Interrupt


def test_resume_ends_with_same_masks(tmp_path):
    full = str(tmp_path / 'full')
    make_runner(full, 14).train()
    part = str(tmp_path / 'part')
    runner = make_runner(part, 14)
    runner._hooks.append(InterruptAt(5))  # mid-interval, after a checkpoint
    with pytest.raises(Interrupt):
        runner.train()
    assert osp.exists(osp.join(part, 'iter_5.pth'))
    make_runner(part, 14, resume=True).train()
    assert kept_of(full)['groups'] == kept_of(part)['groups']


def test_resuming_a_shrunk_student_needs_cpd_runner(tmp_path):
    runner = make_runner(str(tmp_path), 14)
    runner._hooks.append(InterruptAt(5))  # after shrinks at iters 2 and 4
    with pytest.raises(Interrupt):
        runner.train()
    ckpt = torch.load(osp.join(tmp_path, 'iter_5.pth'), weights_only=False)
    assert ckpt['cpd_pruning']['physical']
    assert ckpt['state_dict']['conv1.weight'].shape[0] < 16
    # what tools/test.py (CPDRunner's load_from) does with it: the model
    # of the original config, pruned to the plan, takes the weights
    from cpd_mm.prune import apply_checkpoint_plan, checkpoint_plan
    assert checkpoint_plan(ckpt)[1] == 'shrunk'
    model = HookToyNet()
    apply_checkpoint_plan(model, 'iter_5.pth', ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt['state_dict'][k]), k
    with pytest.raises(ValueError, match='resume it with CPDRunner'):
        make_runner(str(tmp_path), 14, resume=True,
                    runner_type=Runner).train()


def test_a_run_shorter_than_the_ramp_is_refused(tmp_path):
    runner = make_runner(str(tmp_path), 6)  # end_iter is 10
    with pytest.raises(ValueError, match='end_iter=10 is after the last'):
        runner.train()
    assert not osp.exists(osp.join(tmp_path, 'pruned_final.pth'))


def test_plan_mismatch_is_refused(tmp_path):
    runner = make_runner(str(tmp_path), 10)
    runner.train()
    ckpt = torch.load(osp.join(tmp_path, 'pruned_final.pth'))
    other = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with pytest.raises(ValueError, match='plan'):
        apply_plan(other, ckpt['meta']['cpd_plan'])


@pytest.mark.parametrize('kwargs,match', [
    (dict(target_sparsity=1.5), 'target_sparsity'),
    (dict(target_sparsity=0), 'target_sparsity'),
    (dict(importance='magic'), 'importance'),
    (dict(interval=0), 'interval'),
    (dict(begin_iter=-1), 'begin_iter'),
    (dict(begin_iter=10, end_iter=5), 'end_iter'),
    (dict(target='energy'), 'target'),
    (dict(ranking='best'), 'ranking'),
    (dict(max_removal=0), 'max_removal'),
    (dict(max_removal=1.5), 'max_removal'),
    (dict(latency_shape=(224, 224)), 'latency_shape'),
    (dict(save_at=(0.7, )), 'save_at'),
    (dict(input_shape=(3, 8)), 'input_shape'),
    (dict(round_to=0), 'round_to'),
])
def test_hook_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPDPruningHook(**kwargs)


def test_round_to_keeps_multiples(tmp_path):
    runner = make_runner(str(tmp_path), 12, round_to=8)
    runner.train()
    plan = kept_of(str(tmp_path))
    widths = {name: len(g['kept']) for name, g in plan['groups'].items()}
    assert any(w < plan['groups'][n]['num_channels']
               for n, w in widths.items()), widths
    assert all(w % 8 == 0 for w in widths.values()), widths


def _ddp_prune(rank, work_dir):
    from mmengine.model import MMDistributedDataParallel
    import cpd_mm.comb as comb
    if rank == 1:  # verification on rank 1 alone finds a failing group
        real = comb.verify_comb

        def verify_comb(model, result, *args, **kwargs):
            report = real(model, result, *args, **kwargs)
            why = 'failed exactness check: seen on rank 1 only'
            result.freeze_group(result.group('conv1'), why)
            report.frozen['conv1'] = why
            return report
        comb.verify_comb = verify_comb
    # a real DDP run: the sampler gives every rank different data, so only
    # the hook's all-reduce of the scores makes the ranks mask alike
    runner = make_runner(osp.join(work_dir, f'rank{rank}'), 16,
                         importance='hessian', launcher='pytorch')
    runner.train()
    assert isinstance(runner.model, MMDistributedDataParallel)
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    # (running statistics stay per rank: mmengine does not broadcast them)
    params = {k: v.detach().clone()
              for k, v in runner.model.module.named_parameters()}
    return dict(kept=hook.kept, sparsity=hook.sparsity(), params=params,
                frozen=hook.base.frozen_channels.copy(),
                verified=dict(hook.verified_frozen),
                conv1=hook.base.group('conv1').channels)


def test_ddp_ranks_mask_the_same_channels(tmp_path):
    """Also when one rank's verification froze a group the others did not:
    every rank freezes the union (a group that failed anywhere is trusted
    nowhere; a freeze cannot be undone where it was made)."""
    from dist_utils import run_distributed
    r0, r1 = run_distributed(_ddp_prune, str(tmp_path), world_size=2,
                             timeout=300)
    assert r0['verified'] == r1['verified'] and 'conv1' in r0['verified']
    assert 'rank 1' in r0['verified']['conv1']
    assert np.array_equal(r0['frozen'], r1['frozen'])
    assert r0['frozen'][r0['conv1']].all()
    assert (~r0['kept']).any() and abs(r0['sparsity'] - 0.5) < 0.05
    assert np.array_equal(r0['kept'], r1['kept'])
    # the pruned structure kept training under DDP: same weights on both
    # ranks after six more iterations
    for k, v in r0['params'].items():
        assert torch.equal(v, r1['params'][k]), k
