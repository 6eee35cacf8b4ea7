"""CPD on the demo segmenter: prune 50% of the parameters with channel-wise
distillation (CWD) from the unpruned model.

Train the baseline first (configs/demo/pspnet_r18_demo-seg.py), then::

    python tools/train.py configs/demo/pspnet_r18_demo-seg_prune.py

``distill`` is the paper's ablation switch: 'cwd', 'cirkd', 'kl' or 'none'.
"""
_base_ = ['./pspnet_r18_demo-seg.py']

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.5     # fraction of parameters removed: edit this line
distill = 'cwd'           # 'cwd' (paper's choice), 'cirkd', 'kl', 'none'
importance = 'hessian'    # 'hessian' (paper), 'hessian_fd', 'taylor', 'l1', 'random'
round_to = 1              # 8: channel counts in multiples of 8

load_from = 'work_dirs/pspnet_r18_demo-seg/epoch_20.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=10,
        begin_iter=10,
        end_iter=150,
        input_shape=(1, 3, 64, 64)),
]

max_epochs = 8
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_epochs,
         by_epoch=True, convert_to_iter_based=True)
]
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4))
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
default_hooks = dict(checkpoint=dict(save_best=None, max_keep_ckpts=1))
