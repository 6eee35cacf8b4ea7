# SeaFormer-Large + LightHead on ADE20K; recipe of the Tiny config
# (8 GPUs x 4 images, AdamW lr 5e-4, 160k iterations, SyncBN). Large has
# three attention stages, hence four head inputs.
# Published: 14.0M params, 6.5 GFLOPs, 43.8 mIoU (single scale).
_base_ = './seaformer-t_8xb4-160k_ade20k-512x512.py'

# ImageNet weights: SeaFormer_L.pth from the official release, converted
# with tools/convert_seaformer.py (see the Tiny config).
model = dict(
    backbone=dict(
        arch='large',
        init_cfg=dict(
            checkpoint='checkpoints/seaformer/seaformer-l_imagenet.pth')),
    decode_head=dict(
        in_channels=[128, 192, 256, 320],
        in_index=[0, 1, 2, 3],
        channels=192,
        embed_dims=[128, 160, 192]))
