"""CPD on RTMDet-tiny (COCO): prune 40% of the parameters while fine-tuning
with distillation from the unpruned detector.

    python tools/train.py configs/cpd/rtmdet_tiny_coco_prune.py
    python tools/test.py mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py \\
        work_dirs/rtmdet_tiny_coco_prune/pruned_final.pth

``load_from`` is the MMDetection model-zoo checkpoint (40.9 box AP); it is
downloaded on first use. What changes besides the CPD additions: a 60-epoch
fine-tuning instead of 300 epochs from ImageNet weights (the strong
augmentation switches off for the last 10, as upstream does for its last
20), and no EMA: the hook writes the pruned student's own weights, and an
average across pruning steps would mix weights of removed channels into the
kept ones. No COCO run was possible where this config was written: the
schedule is a starting point, not a tuned recipe.
"""
_base_ = ['mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py']
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.4     # fraction of parameters removed: edit this line
distill = 'kl'            # 'kl' (per-class binary KL of the class maps),
#                           'cwd' (channel-wise, FPN levels) or 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

load_from = 'https://download.openmmlab.com/mmdetection/v3.0/rtmdet/rtmdet_tiny_8xb32-300e_coco/rtmdet_tiny_8xb32-300e_coco_20220902_112414-78e30dcc.pth'  # noqa
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# 462 iterations per epoch at 8x32 images: prune every 200 iterations until
# iteration 9000 (about 20 epochs), then fine-tune the pruned structure.
max_epochs = 60
stage2_num_epochs = 10
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=200,
        begin_iter=200,
        end_iter=9000,
        input_shape=(1, 3, 320, 320)),
    dict(
        type='PipelineSwitchHook',
        switch_epoch=max_epochs - stage2_num_epochs,
        switch_pipeline={{_base_.train_pipeline_stage2}}),
]
train_cfg = dict(
    max_epochs=max_epochs,
    dynamic_intervals=[(max_epochs - stage2_num_epochs, 1)])
base_lr = 0.002
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=500),
    dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=0,
         end=max_epochs, T_max=max_epochs, by_epoch=True,
         convert_to_iter_based=True),
]
