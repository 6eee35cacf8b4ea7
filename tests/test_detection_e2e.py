"""The demo detector end to end: prune while training (hook + distiller),
write pruned_final.pth and evaluate it with the ORIGINAL config through
tools/test.py (COCO bbox mAP)."""
import os.path as osp
import re

import pytest
import torch

pytest.importorskip('mmdet')

DET_CFG = 'configs/demo/rtmdet_demo-det.py'
PRUNE_CFG = 'configs/demo/rtmdet_demo-det_prune.py'


def _data_options(root):
    """--cfg-options pointing the demo config at the tiny set ``root``."""
    ann = osp.join(root, 'annotations', 'instances_val.json')
    opts = [f'test_evaluator.ann_file={ann}', f'val_evaluator.ann_file={ann}']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.dataset.data_root={root}',
                 f'{loader}.num_workers=0',
                 f'{loader}.persistent_workers=False']
    return opts


def test_prune_demo_detector_then_test_with_original_config(
        tmp_path, run_tool, repo_root, tiny_det_data):
    # the prune config with a tiny schedule: 16 images, batch 8, one epoch,
    # a pruning step at both iterations, random start
    child = tmp_path / 'prune_tiny.py'
    child.write_text(f"""_base_ = ['{osp.join(repo_root, PRUNE_CFG)}']
load_from = None
train_dataloader = dict(batch_size=8)
train_cfg = dict(max_epochs=1, val_interval=10)  # tools/test.py evaluates
default_hooks = dict(logger=dict(interval=1))
custom_hooks = [dict(type='CPDPruningHook', target_sparsity=0.5,
                     importance='hessian', round_to=8, interval=1,
                     begin_iter=1, end_iter=2, input_shape=(1, 3, 96, 96))]
""")
    work = tmp_path / 'prune'
    proc = run_tool('train.py', child, '--work-dir', work, '--cfg-options',
                    *_data_options(tiny_det_data))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'CPD: combed RTMDet' in log and 'loss_kd_kl' in log
    ckpt = work / 'pruned_final.pth'
    meta = torch.load(ckpt)['meta']
    full = float(re.search(r'([0-9.]+) M params, target', log).group(1))
    assert meta['cpd_plan'] and meta['params'] < 0.6 * full * 1e6

    # the ORIGINAL config: tools/test.py applies the plan, then loads
    proc = run_tool('test.py', DET_CFG, ckpt, '--work-dir', tmp_path / 'test',
                    '--cfg-options', *_data_options(tiny_det_data))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'coco/bbox_mAP:' in log and 'coco/bbox_mAP_50:' in log
