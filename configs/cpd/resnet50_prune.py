"""CPD on ResNet-50 (ImageNet): prune 50% of the parameters during a short
fine-tuning with KL distillation from the unpruned model.

    python tools/train.py configs/cpd/resnet50_prune.py

Starts from the ImageNet weights of MMPretrain's
``mmpretrain::resnet/resnet50_8xb32_in1k.py``: ``load_from`` is
its model-zoo URL, which mmengine downloads once into
``~/.cache/torch/hub/checkpoints/``. Offline, put the file there (the error
message names the path) or set ``load_from`` to a local copy.
"""
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.5     # fraction of parameters removed: edit this line
distill = 'kl'            # 'kl' or 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

# MMPretrain's model zoo (resnet50_8xb32_in1k in its metafile)
load_from = ('https://download.openmmlab.com/mmclassification/v0/resnet/'
             'resnet50_8xb32_in1k_20210831-ea4938fc.pth')
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# 5005 iterations per epoch at 8x32: prune every 500 iterations during the
# first 6 epochs, fine-tune the pruned structure for the rest.
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=500,
        begin_iter=500,
        end_iter=30000,
        input_shape=(1, 3, 224, 224)),
]
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=30,
    convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
