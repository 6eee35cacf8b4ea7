"""CPD on SeaFormer-L (ADE20K 512x512): prune 40% of the parameters with
channel-wise distillation (CWD) from the unpruned model.

    python tools/train.py configs/cpd/seaformer-l_ade20k_prune.py

``load_from`` is a local file: MMSegmentation has no SeaFormer, so there is
no OpenMMLab model-zoo URL. Take the official SeaFormer-L ADE20K checkpoint
of the authors' release (github.com/fudan-zvg/SeaFormer) and convert it::

    python tools/convert_seaformer.py SEAFORMER_L_ADE20K.pth \
        checkpoints/seaformer/seaformer-l_ade20k.pth

key_dim is pruned uniformly over heads together with the four axial
positional embeddings; the attention scale keeps its original value.
"""
_base_ = ['../seaformer/seaformer-l_8xb4-160k_ade20k-512x512.py']

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.4     # fraction of parameters removed: edit this line
distill = 'cwd'           # 'cwd' (paper's choice), 'cirkd', 'kl', 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

# no model-zoo URL: see the docstring for where this file comes from
load_from = 'checkpoints/seaformer/seaformer-l_ade20k.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# prune every 1000 iterations during the first 40k, fine-tune to 80k
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=1000,
        begin_iter=1000,
        end_iter=40000,
        input_shape=(1, 3, 512, 512)),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=80000,
                 val_interval=8000)
param_scheduler = [
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=0, end=80000,
         by_epoch=False)
]
