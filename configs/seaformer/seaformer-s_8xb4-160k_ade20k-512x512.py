# SeaFormer-Small + LightHead on ADE20K; recipe of the Tiny config
# (8 GPUs x 4 images, AdamW lr 5e-4, 160k iterations, SyncBN).
# Published: 4.0M params, 1.1 GFLOPs, 39.4 mIoU (single scale).
_base_ = './seaformer-t_8xb4-160k_ade20k-512x512.py'

# ImageNet weights: SeaFormer_S.pth from the official release, converted
# with tools/convert_seaformer.py (see the Tiny config).
model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(
            checkpoint='checkpoints/seaformer/seaformer-s_imagenet.pth')),
    decode_head=dict(
        in_channels=[48, 160, 192],
        channels=128,
        embed_dims=[96, 128]))
