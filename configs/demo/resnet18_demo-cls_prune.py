"""CPD on the demo classifier: halve its latency on onnxruntime (CPU, one
thread) while distilling from the unpruned model.

Train the baseline first (configs/demo/resnet18_demo-cls.py), then::

    python tools/train.py configs/demo/resnet18_demo-cls_prune.py

The hook writes work_dirs/resnet18_demo-cls_prune/pruned_final.pth, which
tools/test.py evaluates with this config or the baseline config.
"""
_base_ = ['./resnet18_demo-cls.py']

# ----------------------------------------------------------------- CPD ---
target = 'latency'        # 'latency' (measured table), 'flops' or 'params'
target_sparsity = 0.5     # fraction of the target removed: edit this line
distill = 'kl'            # 'kl' or 'none' (classifiers)
importance = 'hessian'    # 'hessian' (paper), 'hessian_fd', 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

# the unpruned baseline is the starting point and the teacher
load_from = 'work_dirs/resnet18_demo-cls/epoch_30.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# 32 iterations per epoch: prune every 16 iterations during the first eight
# epochs (15 steps), then fine-tune the pruned structure for eight more.
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target=target,
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=16,
        begin_iter=16,
        end_iter=256,
        input_shape=(1, 3, 32, 32),
        save_at=(0.1, 0.2, 0.3, 0.4)),
]

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=16,
    convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=16, val_interval=4)
default_hooks = dict(checkpoint=dict(save_best=None, max_keep_ckpts=1))
