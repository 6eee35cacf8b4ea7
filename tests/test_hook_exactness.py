"""What the pruning hook guarantees about the files and buffers it touches:
a failed final check stops the run and writes nothing under the final name;
checkpoints are written atomically; the hessian_fd probe leaves the
distiller's memories alone; layers that do not train count in the
reachability check before training."""
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import DATASETS, DefaultScope
from mmengine.runner import Runner
from mmseg.structures import SegDataSample
from mmengine.structures import PixelData
from torch.utils.data import Dataset

import cpd_mm.comb.surgery as surgery
from cpd_mm.comb import ChannelGates
from cpd_mm.prune.snapshot import GATED_PLAN_KEY, PrunedCheckError
from cpd_mm.utils.checkpoint import save_checkpoint_atomic
from test_distiller import seg_cfg
from test_prune_hook import CPDPruningHook, HookToyNet, make_runner
from cpd_mm.prune import CPDRunner


class BreakSurgeryAfterComb(Hook):
    """From ``before_train`` on (after the pruning hook combed and verified
    the model), surgery slices BatchNorm running means with the wrong
    channels ('wrong': a broken passenger rule), or raises on ``bn2``'s
    ('raises'): breaks that only the final check sees."""
    priority = 'LOWEST'

    def __init__(self, monkeypatch, how):
        self.monkeypatch, self.how = monkeypatch, how

    def before_train(self, runner):
        real = surgery.keep_param

        def broken(module, pname, axis, keep):
            if pname == 'running_mean' and self.how == 'wrong':
                keep = keep[::-1].copy()
            if pname == 'running_mean' and module.running_mean.numel() == 32 \
                    and self.how == 'raises':  # bn2 (32 channels)
                raise IndexError('broken rule')
            real(module, pname, axis, keep)
        self.monkeypatch.setattr(surgery, 'keep_param', broken)


@pytest.mark.parametrize('how', ['wrong', 'raises'])
def test_failed_final_check_stops_and_keeps_the_gated_model(tmp_path,
                                                            monkeypatch,
                                                            how):
    runner = make_runner(str(tmp_path), 12, shrink='never')
    runner._hooks.append(BreakSurgeryAfterComb(monkeypatch, how))
    with pytest.raises(PrunedCheckError) as err:
        runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    pruned = {g.name for g in hook.base.groups
              if not hook.kept[g.channels].all()}
    assert pruned == {'conv1', 'conv2'}
    # 'wrong' breaks both (each has a BatchNorm), 'raises' bn2's (conv2):
    # the error names exactly the groups that differ
    differ = pruned if how == 'wrong' else {'conv2'}
    assert set(err.value.groups) == differ, err.value.groups
    assert f'differ: {", ".join(sorted(differ))}' in str(err.value)
    if how == 'raises':
        assert 'broken rule' in err.value.groups['conv2']
    assert not osp.exists(tmp_path / 'pruned_final.pth')
    assert not list(tmp_path.glob('*.tmp'))
    gated_path = tmp_path / 'pruned_final.FAILED_gated.pth'
    assert str(gated_path) in str(err.value)
    ckpt = torch.load(gated_path)
    assert 'cpd_plan' not in ckpt['meta']  # not loadable as a pruned model
    # full-size weights + its masks give the model the run trained
    model = HookToyNet()
    model.load_state_dict(ckpt['state_dict'], strict=True)
    gates = ChannelGates(model, hook.base)
    gates.set_plan(ckpt['meta'][GATED_PLAN_KEY])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(x),
                                   runner.model.eval()(x), rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize('how', ['wrong', 'raises'])
def test_failed_shrink_check_stops_before_the_student_changes(
        tmp_path, monkeypatch, how):
    """shrink='step': the check runs before the first physical removal
    (iter 4); the run stops there, the student keeps its size and the gated
    model is kept, as for the final check."""
    runner = make_runner(str(tmp_path), 12)
    runner._hooks.append(BreakSurgeryAfterComb(monkeypatch, how))
    with pytest.raises(PrunedCheckError) as err:
        runner.train()
    # the ramp's first step removes channels at iter 4 (its goal at iter 2
    # is 0): the run stops in that iteration's hook
    assert runner.iter == 3
    assert runner.model.conv1.weight.shape[0] == 16
    gated_path = tmp_path / 'shrunk_iter_4.FAILED_gated.pth'
    assert str(gated_path) in str(err.value) and gated_path.exists()
    assert 'conv2' in err.value.groups
    assert not osp.exists(tmp_path / 'pruned_final.pth')


def test_a_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    from mmengine.fileio.backends.local_backend import LocalBackend

    def put_half(self, obj, filepath):
        with open(filepath, 'wb') as f:
            f.write(obj[:len(obj) // 2])
        raise OSError('disk full')
    monkeypatch.setattr(LocalBackend, 'put', put_half)
    path = str(tmp_path / 'pruned_final.pth')
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint_atomic({'state_dict': {'w': torch.ones(1000)}}, path)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    save_checkpoint_atomic({'state_dict': {'w': torch.ones(3)}}, path)
    assert torch.equal(torch.load(path)['state_dict']['w'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['pruned_final.pth']


@DATASETS.register_module(force=True)
class HookSegData(Dataset):
    """Six 32x32 images with 4-class label maps (255 = ignored)."""

    def __init__(self, n=6):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = torch.randint(0, 4, (1, 32, 32), generator=g)
        label[:, :4] = 255
        sample = SegDataSample(
            gt_sem_seg=PixelData(data=label),
            metainfo=dict(img_shape=(32, 32), ori_shape=(32, 32)))
        return dict(inputs=torch.randint(0, 256, (3, 32, 32), generator=g,
                                         dtype=torch.uint8),
                    data_samples=sample)


def _cirkd_buffers(work_dir, importance):
    """The distiller's buffers after three iterations (PSPNet student,
    CIRKD with its memory queues), pruning only after the last one."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        return dict(_train_cirkd(work_dir, importance).model.named_buffers())


def _train_cirkd(work_dir, importance, shrink='never', distill='cirkd',
                 steps=None):
    hook = dict(type='CPDPruningHook', target_sparsity=0.2,
                importance=importance, interval=1, begin_iter=3, end_iter=3,
                input_shape=(1, 3, 32, 32), save_pruned=False, shrink=shrink)
    hook.update(steps or {})
    runner = CPDRunner(
        model=dict(type='CPDDistiller', student=seg_cfg(), teacher='self',
                   distill=distill),
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=dict(type='HookSegData'),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=2, num_workers=0,
            collate_fn=dict(type='pseudo_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=False, max_iters=3),
        custom_hooks=[hook],
        default_hooks=dict(checkpoint=None),
        randomness=dict(seed=0), default_scope='mmseg')
    runner.train()
    return runner


@pytest.mark.parametrize('distill', ['cirkd', 'cwd', 'kl'])
def test_distiller_trains_on_as_the_student_shrinks(tmp_path, distill):
    """shrink='step' with the segmentation presets: the student loses
    channels at iterations 1 and 2 and trains one more with the teacher
    (CIRKD's projection head follows the student's embedding width)."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        runner = _train_cirkd(str(tmp_path), 'hessian', shrink='step',
                              distill=distill, steps=dict(
                                  begin_iter=0, end_iter=2,
                                  target_sparsity=0.4))
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    assert runner.iter == 3 and hook.physical and hook.finished
    model = runner.model
    full = sum(p.numel() for p in model.teacher.parameters())
    small = sum(p.numel() for p in model.student.parameters())
    assert small < 0.8 * full  # the teacher kept its size
    if distill == 'cirkd':
        head = model.distill_losses[1]
        emb = model.student.decode_head.conv_seg.in_channels
        assert head.student_channels == emb == \
            head.project_head[0].weight.shape[1]


def test_hessian_fd_probe_leaves_the_distillers_memories(tmp_path):
    """The probe's two extra passes run the distiller's loss: CIRKD's
    queues, pointers and update count must advance once per iteration, as
    without the probe (all buffers equal to a 'hessian' run's)."""
    probed = _cirkd_buffers(str(tmp_path / 'fd'), 'hessian_fd')
    plain = _cirkd_buffers(str(tmp_path / 'plain'), 'hessian')
    assert int(probed['distill_losses.1.num_updates']) == 3
    assert probed.keys() == plain.keys()
    for name, value in plain.items():
        assert torch.equal(probed[name], value), name


CLS_PRUNE = 'configs/demo/resnet18_demo-cls_prune.py'


def _frozen_stage_runner(repo_root, work_dir, data_root, frozen_stages,
                         target_sparsity):
    cfg = Config.fromfile(osp.join(repo_root, CLS_PRUNE))
    cfg.model.student.backbone.frozen_stages = frozen_stages
    cfg.load_from = None
    cfg.work_dir = work_dir
    cfg.custom_hooks[0].update(target='params', save_at=(), round_to=1,
                               interval=1, begin_iter=1, end_iter=4,
                               target_sparsity=target_sparsity)
    cfg.train_dataloader.update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.dataset.data_root = data_root
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    return Runner.from_cfg(cfg)


def test_layers_that_do_not_train_count_in_the_reachability_check(
        repo_root, tiny_cls_data, tmp_path):
    """ResNet-18 with frozen_stages=1: the stem and layer1 get no gate
    gradient and are never pruned. A target that only they make
    unreachable is refused before the first iteration, with nothing
    written (before: a warning at the end of training)."""
    def reachable(frozen_stages):
        work = tmp_path / f'frozen{frozen_stages}'
        runner = _frozen_stage_runner(repo_root, str(work), tiny_cls_data,
                                      frozen_stages, 0.99)
        with pytest.raises(ValueError, match='cannot be reached') as err:
            runner.train()
        assert runner.iter == 0 and not list(work.glob('*.pth'))
        return float(str(err.value).split('sparsity ')[-1].split()[0])
    free, frozen = reachable(-1), reachable(1)
    assert frozen < free - 0.01, (frozen, free)
    target = round((frozen + free) / 2, 3)
    work = tmp_path / 'between'
    runner = _frozen_stage_runner(repo_root, str(work), tiny_cls_data, 1,
                                  target)
    with pytest.raises(ValueError, match='cannot be reached') as err:
        runner.train()
    assert 'do not train' in str(err.value)
    assert runner.iter == 0 and not list(work.glob('*.pth'))
