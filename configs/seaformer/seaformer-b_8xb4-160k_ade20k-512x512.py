# SeaFormer-Base + LightHead on ADE20K; recipe of the Tiny config
# (8 GPUs x 4 images, AdamW lr 5e-4, 160k iterations, SyncBN).
# Published: 8.6M params, 1.8 GFLOPs, 41.9 mIoU (single scale).
_base_ = './seaformer-t_8xb4-160k_ade20k-512x512.py'

# ImageNet weights: SeaFormer_B.pth from the official release, converted
# with tools/convert_seaformer.py (see the Tiny config).
model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(
            checkpoint='checkpoints/seaformer/seaformer-b_imagenet.pth')),
    decode_head=dict(
        in_channels=[64, 192, 256],
        channels=160,
        embed_dims=[128, 160]))
