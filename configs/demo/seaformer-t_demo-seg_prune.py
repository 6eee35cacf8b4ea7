"""CPD on the demo SeaFormer-T: prune 40% of the parameters with CWD.

Train the baseline first (configs/demo/seaformer-t_demo-seg.py), then::

    python tools/train.py configs/demo/seaformer-t_demo-seg_prune.py
"""
_base_ = ['./seaformer-t_demo-seg.py']

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.4     # fraction of parameters removed: edit this line
distill = 'cwd'           # 'cwd' (paper's choice), 'cirkd', 'kl', 'none'
importance = 'hessian'    # 'hessian' (paper), 'hessian_fd', 'taylor', 'l1', 'random'
round_to = 1              # 8: channel counts in multiples of 8

load_from = 'work_dirs/seaformer-t_demo-seg/epoch_15.pth'
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
    dict(type='PolyLR', eta_min=1e-5, power=1.0, begin=0, end=max_epochs,
         by_epoch=True, convert_to_iter_based=True)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
default_hooks = dict(checkpoint=dict(save_best=None, max_keep_ckpts=1))
