"""The pruning hook on the paths users take: a shipped prune config with the
distiller and frozen stages through tools/train.py, then tools/test.py with
the original config; exclude; a FLOPs target measured by mmengine; AMP with
a dynamic loss scale."""
import json
import os.path as osp

import numpy as np
import pytest
import torch

from test_prune_hook import CPDPruningHook, HookToyNet, make_runner

PRUNE_CFG = 'configs/demo/resnet18_demo-cls_prune.py'
CLS_CFG = 'configs/demo/resnet18_demo-cls.py'


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _data(root):
    opts = ['train_dataloader.batch_size=8', 'default_hooks.logger.interval=1']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.dataset.data_root={root}',
                 f'{loader}.num_workers=0',
                 f'{loader}.persistent_workers=False']
    return opts


def test_shipped_prune_config_with_frozen_stages(tmp_path, run_tool,
                                                 tiny_cls_data):
    """frozen_stages=1 (stem and layer1 do not train): no crash, those
    groups are left whole with a logged reason, the rest reaches the
    target, and the pruned checkpoint evaluates with the original config."""
    log = _ok(run_tool(
        'train.py', PRUNE_CFG, '--work-dir', tmp_path, '--cfg-options',
        'model.student.backbone.frozen_stages=1', 'load_from=None',
        'train_cfg.max_epochs=2', 'train_cfg.val_interval=2',
        'custom_hooks.0.interval=1', 'custom_hooks.0.begin_iter=1',
        'custom_hooks.0.end_iter=4', 'custom_hooks.0.save_at=[0.25]',
        *_data(tiny_cls_data)))
    assert 'not pruned' in log and 'frozen' in log
    plan = json.load(open(tmp_path / 'cpd_plan.json'))
    pruned = set(plan['groups'])
    assert pruned, 'nothing was pruned'
    assert not any(g == 'backbone.conv1' or g.startswith('backbone.layer1.')
                   for g in pruned), pruned
    ckpt = torch.load(tmp_path / 'pruned_final.pth')
    assert ckpt['meta']['sparsity'] >= 0.5 - 0.02
    assert osp.isfile(tmp_path / 'pruned_sparsity_25.pth')  # save_at
    log = _ok(run_tool('test.py', CLS_CFG, tmp_path / 'pruned_final.pth',
                       '--work-dir', tmp_path / 'test', '--cfg-options',
                       *_data(tiny_cls_data)))
    assert 'accuracy/top1' in log


def test_exclude_keeps_a_layer_whole(tmp_path):
    runner = make_runner(str(tmp_path), 10, exclude=['conv1'])
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    g = hook.base.group('conv1')
    assert hook.kept[g.channels].all()
    assert any('excluded by user: conv1' in r for r in g.reasons)
    assert abs(hook.sparsity() - 0.5) < 0.05  # reached elsewhere


def test_flops_target_is_reached(tmp_path):
    from mmengine.analysis import get_model_complexity_info
    from cpd_mm.prune import apply_plan
    runner = make_runner(str(tmp_path), 10, target='flops',
                         target_sparsity=0.4)
    runner.train()
    plan = torch.load(tmp_path / 'pruned_final.pth')['meta']['cpd_plan']
    x = torch.randn(1, 3, 8, 8)

    def flops(m):
        return get_model_complexity_info(m.eval(), inputs=(x, ),
                                         show_table=False,
                                         show_arch=False)['flops']
    full = flops(HookToyNet())
    small = flops(apply_plan(HookToyNet(), plan))
    # mmengine also counts norms and adds, the cost model convs/linears
    assert 0.55 <= small / full <= 0.62, small / full


def _amp_scores(tmp_path, loss_scale, monkeypatch):
    """The hook's scores after 3 iterations with AmpOptimWrapper on CPU
    (bfloat16 autocast, a GradScaler on the CPU: AmpOptimWrapper itself
    insists on CUDA, the scaling logic is the same)."""
    import mmengine.optim.optimizer.amp_optimizer_wrapper as amp
    monkeypatch.setattr(amp, 'is_cuda_available', lambda: True)
    monkeypatch.setattr(
        amp, 'GradScaler',
        lambda **kw: torch.amp.GradScaler('cpu', **kw))
    runner = make_runner(str(tmp_path / str(loss_scale)), 10, begin_iter=4,
                         interval=4, end_iter=8)
    runner.optim_wrapper = dict(  # lr 0: both runs see the same weights
        type='AmpOptimWrapper', loss_scale=loss_scale, dtype='bfloat16',
        optimizer=dict(type='SGD', lr=0.0))
    scores = {}

    class Capture:
        priority = 'HIGHEST'

        def __getattr__(self, name):
            return lambda *a, **k: None

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            hook = [h for h in runner.hooks
                    if isinstance(h, CPDPruningHook)][0]
            if runner.iter == 3:
                scores['s'] = hook.scorer.current()
    runner._hooks.insert(0, Capture())
    runner.train()
    return scores['s']


def test_amp_scores_are_unscaled_through_the_runner(tmp_path, monkeypatch):
    a = _amp_scores(tmp_path, 1.0, monkeypatch)
    b = _amp_scores(tmp_path, 2.0 ** 16, monkeypatch)
    assert a.max() > 0
    # without unscaling b would be 2^32 times a
    np.testing.assert_allclose(b, a, rtol=0.05, atol=1e-6 * a.max())


def test_latency_target_with_a_measured_table(tmp_path, monkeypatch):
    """target='latency': the hook measures a latency table (onnxruntime,
    cached per model and machine), prunes until the predicted latency is
    (1 - target_sparsity) of the original, and logs it."""
    monkeypatch.setenv('CPD_MM_CACHE', str(tmp_path / 'cache'))
    # at the 8x8 training input the toy net's layers take 1-3 us each,
    # mostly fixed overhead; the table is measured at a deployment size
    runner = make_runner(str(tmp_path / 'run'), 10, target='latency',
                         target_sparsity=0.3, round_to=8,
                         latency_shape=(1, 3, 64, 64))
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    table = hook.cost.table
    assert table is not None and table.full_ms > 0
    predicted = hook.cost.latency(hook.kept)
    assert predicted <= 0.7 * hook.cost.total_latency * 1.001
    assert hook.sparsity() >= 0.3 - 1e-3
    assert runner.message_hub.get_scalar('train/cpd_latency_ms').current() \
        == pytest.approx(predicted)
    assert list((tmp_path / 'cache' / 'latency').glob('*.json'))


def test_unreachable_target_is_refused_before_training(tmp_path):
    """max_removal=0.5 keeps half of every group: 80% of the parameters
    cannot go. The hook says so before the first iteration, with the
    sparsity the floors allow, instead of training to a warning."""
    runner = make_runner(str(tmp_path), 10, target_sparsity=0.8,
                         max_removal=0.5)
    with pytest.raises(ValueError, match='cannot be reached') as err:
        runner.train()
    assert 'max_removal=0.5' in str(err.value)
    reachable = float(str(err.value).split('sparsity ')[-1].split()[0])
    assert 0.5 < reachable < 0.8  # half of each width: ~3/4 of the convs
    assert runner.iter == 0
    assert not list(tmp_path.glob('*.pth'))


def test_latency_table_in_the_deployed_precision(tmp_path, monkeypatch):
    """latency_precision='int8': the hook's table times quantized graphs,
    so target='latency' selects for the INT8 deployment; a precision the
    project cannot measure is refused when the hook is built."""
    monkeypatch.setenv('CPD_MM_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(ValueError, match='latency_precision'):
        CPDPruningHook(target='latency', latency_precision='int4')
    runner = make_runner(str(tmp_path / 'run'), 10, target='latency',
                         target_sparsity=0.3, round_to=8,
                         latency_shape=(1, 3, 64, 64),
                         latency_precision='int8')
    runner.train()
    hook = [h for h in runner.hooks if isinstance(h, CPDPruningHook)][0]
    assert hook.cost.table.precision == 'int8'
    assert hook.sparsity() >= 0.3 - 1e-3
