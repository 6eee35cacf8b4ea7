"""CPD on the demo detector: prune 50% of the parameters while distilling
from the unpruned model.

Train the baseline first (configs/demo/rtmdet_demo-det.py), then::

    python tools/train.py configs/demo/rtmdet_demo-det_prune.py

The hook writes work_dirs/rtmdet_demo-det_prune/pruned_final.pth, which
tools/test.py evaluates (COCO bbox mAP) with the baseline config.

Measured here (50% of the parameters, bbox mAP): 42.3 with 'kl' from the
unpruned starting model (32.5 mAP, not converged), 35.2 with 'cwd', 46.2
with 'none'; the unpruned model fine-tuned the same 6 epochs reaches 45.9.
A weak teacher holds the student back: with the fine-tuned model as teacher
(``teacher=dict(config=..., checkpoint=...)``) 'kl' reaches 47.3
(benchmarks/ablation_det_*.json).
"""
_base_ = ['./rtmdet_demo-det.py']

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.5     # fraction of parameters removed: edit this line
distill = 'kl'            # 'kl' (per-class binary KL of the class maps),
#                           'cwd' (channel-wise, FPN levels) or 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

# the unpruned baseline is the starting point and the teacher
load_from = 'work_dirs/rtmdet_demo-det/epoch_12.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# 63 iterations per epoch: prune every 8 iterations during the first two
# epochs, then fine-tune the pruned structure for four more.
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=8,
        begin_iter=8,
        end_iter=128,
        input_shape=(1, 3, 96, 96)),
]

max_epochs = 6
param_scheduler = [
    dict(type='CosineAnnealingLR', eta_min=2e-4, begin=0, end=max_epochs,
         T_max=max_epochs, by_epoch=True, convert_to_iter_based=True),
]
optim_wrapper = dict(optimizer=dict(lr=0.002))
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
default_hooks = dict(checkpoint=dict(save_best=None, max_keep_ckpts=1))
