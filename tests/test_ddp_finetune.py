"""Fine-tuning a pruned checkpoint under DDP (2 gloo processes on CPU).

tools/train.py's ``main`` runs in each rank with ``--launcher pytorch``:
the mmengine Runner is distributed and wraps the model in
MMDistributedDataParallel. The plan of the pruned checkpoint must be
applied before that wrapping; applied after it, DDP would keep reducing
the gradients of the discarded full-size parameters (each rank would then
train alone, or DDP would stop with "Expected to have finished reduction").
"""
import importlib.util
import os.path as osp

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from dist_utils import run_distributed
from equivalence import random_kept

CLS_CFG = 'configs/demo/resnet18_demo-cls.py'


@HOOKS.register_module(force=True)
class _StartStateProbe(Hook):
    """Keeps the weights the training starts from (after loading)."""

    def before_train(self, runner):
        model = runner.model.module
        runner.cpd_test_start = {k: v.detach().clone()
                                 for k, v in model.state_dict().items()}


def _finetune(rank, repo_root, config, checkpoint, work_dir, data_root):
    spec = importlib.util.spec_from_file_location(
        'cpd_tools_train', osp.join(repo_root, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    opts = ['train_cfg.max_epochs=2', 'train_dataloader.batch_size=4',
            f'train_dataloader.dataset.data_root={data_root}',
            'train_dataloader.num_workers=0',
            'train_dataloader.persistent_workers=False',
            f'load_from={checkpoint}', 'default_hooks.logger.interval=1']
    runner = train.main([config, '--work-dir', work_dir, '--launcher',
                         'pytorch', '--no-validate', '--cfg-options', *opts])
    from mmengine.model import MMDistributedDataParallel
    module = runner.model.module
    trained = {id(p) for group in runner.optim_wrapper.param_groups
               for p in group['params']}
    return dict(
        distributed=runner.distributed, world_size=runner.world_size,
        ddp=isinstance(runner.model, MMDistributedDataParallel),
        iters=runner.iter,
        optimizer_has_module_params=trained == {
            id(p) for p in module.parameters() if p.requires_grad},
        start=runner.cpd_test_start,
        params={k: v.detach().clone() for k, v in module.named_parameters()},
        loss=runner.message_hub.get_scalar('train/loss').current())


def _pruned_checkpoint(repo_root, path):
    """The demo classifier with half of each group's channels removed,
    saved as the pruning hook saves pruned_final.pth."""
    from mmengine.runner.checkpoint import save_checkpoint

    from cpd_mm.apis import init_model
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import apply_plan, make_plan
    torch.manual_seed(0)
    model = init_model(osp.join(repo_root, CLS_CFG), device='cpu')
    full = sum(p.numel() for p in model.parameters())
    comb = comb_model(model, input_shape=(1, 3, 32, 32))
    plan = make_plan(comb, random_kept(comb, 0.5, np.random.default_rng(0)),
                     model)
    apply_plan(model, plan, comb)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * full
    save_checkpoint({'state_dict': model.state_dict(),
                     'meta': {'cpd_plan': plan}}, str(path))
    return model.state_dict()


def test_pruned_checkpoint_finetunes_under_ddp(repo_root, tiny_cls_data,
                                               tmp_path):
    ckpt = tmp_path / 'pruned_final.pth'
    pruned = _pruned_checkpoint(repo_root, ckpt)
    config = tmp_path / 'child.py'
    config.write_text(
        f"_base_ = ['{osp.join(repo_root, CLS_CFG)}']\n"
        "custom_hooks = [dict(type='_StartStateProbe')]\n")
    ranks = run_distributed(_finetune, repo_root, str(config), str(ckpt),
                            str(tmp_path / 'work'), tiny_cls_data,
                            world_size=2, timeout=180)
    for rank in ranks:
        assert rank['distributed'] and rank['world_size'] == 2
        assert rank['ddp'] and rank['optimizer_has_module_params']
        # 24 images / (2 ranks x 4) = 3 iterations per epoch, 2 epochs
        assert rank['iters'] == 6 and np.isfinite(rank['loss'])
        # training started from the checkpoint's (pruned) weights: neither
        # the full-size model nor init_weights' random ones
        assert rank['start'].keys() == pruned.keys()
        for key, value in pruned.items():
            assert torch.equal(rank['start'][key], value), key
        params = rank['params']
        assert {k: v.shape for k, v in params.items()} == {
            k: pruned[k].shape for k in params}
        assert any(not torch.equal(v, pruned[k]) for k, v in params.items())
    # the ranks saw different images: equal weights mean DDP averaged the
    # gradients of the pruned parameters
    for key, value in ranks[0]['params'].items():
        assert torch.equal(value, ranks[1]['params'][key]), key
    # rank 0's checkpoints carry the plan: the original config evaluates them
    saved = torch.load(tmp_path / 'work' / 'epoch_2.pth', weights_only=False)
    assert saved['meta']['cpd_plan'] == torch.load(
        ckpt, weights_only=False)['meta']['cpd_plan']
    from cpd_mm.apis import init_model
    model = init_model(osp.join(repo_root, CLS_CFG), str(tmp_path / 'work' /
                       'epoch_2.pth'), device='cpu')
    for key, value in ranks[0]['params'].items():
        assert torch.equal(model.state_dict()[key], value), key
