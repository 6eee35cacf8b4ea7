"""CPD on ViT-DeiT-S/16 + UPerNet (ADE20K 512x512): prune 40% of the
parameters (the paper's operating point) with CWD distillation from the
unpruned model.

    python tools/train.py configs/cpd/vit-deit-s16_upernet_ade20k_prune.py

MMSegmentation's ViT uses ``nn.MultiheadAttention`` (through mmcv); comb
prunes it as a stop op and surgery replaces it by a decoupled drop-in
(``PrunedMultiheadAttention``), so the residual stream, the head dims, the
MLPs, the neck and the UPerNet head (with its auxiliary head) all shrink.
"""
_base_ = ['mmseg::vit/vit_deit-s16_upernet_8xb2-80k_ade20k-512x512.py']
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.4     # fraction of parameters removed: edit this line
distill = 'cwd'           # 'cwd' (paper's choice), 'cirkd', 'kl', 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

# MMSegmentation's model zoo (vit_deit-s16_upernet_8xb2-80k_ade20k-512x512
# in its metafile); mmengine downloads it once into
# ~/.cache/torch/hub/checkpoints/ (offline: put the file there)
load_from = ('https://download.openmmlab.com/mmsegmentation/v0.5/vit/'
             'upernet_deit-s16_512x512_80k_ade20k/'
             'upernet_deit-s16_512x512_80k_ade20k_20210624_095228-afc93ec2'
             '.pth')
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
        interval=1000,
        begin_iter=1000,
        end_iter=40000,
        input_shape=(1, 3, 512, 512)),
]
