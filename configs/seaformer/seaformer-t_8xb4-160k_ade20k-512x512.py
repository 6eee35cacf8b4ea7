# SeaFormer-Tiny + LightHead on ADE20K, the paper's recipe (Wan et al., ICLR
# 2023; fudan-zvg/SeaFormer local_configs/seaformer/*_4x8_ade20k.py):
# 8 GPUs x 4 images, AdamW lr 5e-4, 160k iterations, SyncBN.
# Published: 1.7M params, 0.6 GFLOPs, 36.5 mIoU (single scale). The official
# 2x8 configs (16 images) use lr 2.5e-4 instead.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)
default_scope = 'mmseg'

crop_size = (512, 512)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=crop_size)

# ImageNet weights of the backbone: download SeaFormer_T.pth from the links in
# https://github.com/fudan-zvg/SeaFormer (seaformer-cls/README.md) and either
# point `checkpoint` at it (its EMA weights are loaded, as the official code
# does) or convert it first, which also checks it:
#   python tools/convert_seaformer.py SeaFormer_T.pth \
#       checkpoints/seaformer/seaformer-t_imagenet.pth --ema
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='SeaFormer',
        arch='tiny',
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/seaformer/seaformer-t_imagenet.pth')),
    decode_head=dict(
        type='LightHead',
        in_channels=[32, 128, 160],
        in_index=[0, 1, 2],
        channels=96,
        embed_dims=[64, 96],
        is_dw=True,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# The base test pipeline plus the official resize to a multiple of 32, placed
# before LoadAnnotations so that mIoU is computed on original-size labels.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(2048, 512), keep_ratio=True),
    dict(type='ResizeToMultiple', size_divisor=32),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4)
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# Keys are matched longest first and only the first match applies (as in
# mmseg 0.x): decode-head parameters get lr x10 (their BN keeps decay),
# positional embeddings and backbone BN ('...bn.weight') get no decay.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.0005, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_emb': dict(decay_mult=0.),
            'head': dict(lr_mult=10.),
            'norm': dict(decay_mult=0.),
            'bn': dict(decay_mult=0.),
        }))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=1500,
        end=160000),
]
# The official runs validate and save every 4k iterations.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=4000)
default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4000))
