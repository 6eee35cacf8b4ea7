"""Demo segmenter: SeaFormer-Tiny + LightHead on the generated scenes.

Data, pipeline, evaluation and runtime come from the PSPNet demo
(data/demo/seg, ADE20K layout, 64x64, 5 classes after reduce_zero_label;
write it with ``python tools/make_demo_data.py seg``). Only the model and the
optimiser differ: the paper's ADE20K recipe (configs/seaformer/) scaled to
CPU, from random weights. Train on CPU in a few minutes::

    python tools/train.py configs/demo/seaformer-t_demo-seg.py
"""
_base_ = './pspnet_r18_demo-seg.py'

num_classes = 5
norm_cfg = dict(type='BN', requires_grad=True)  # single-process CPU
model = dict(
    _delete_=True,  # replaces the PSPNet (and its auxiliary head)
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=(64, 64)),
    backbone=dict(
        type='SeaFormer', arch='tiny', drop_path_rate=0.1, norm_cfg=norm_cfg),
    decode_head=dict(
        type='LightHead',
        in_channels=[32, 128, 160],
        in_index=[0, 1, 2],
        channels=96,
        embed_dims=[64, 96],
        is_dw=True,
        dropout_ratio=0.1,
        num_classes=num_classes,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# The paper's optimiser (AdamW, no decay on positional embeddings and BN,
# head lr x10) with a larger base lr: no ImageNet weights, few iterations.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        custom_keys={
            'pos_emb': dict(decay_mult=0.),
            'head': dict(lr_mult=10.),
            'norm': dict(decay_mult=0.),
            'bn': dict(decay_mult=0.),
        }))
max_epochs = 15
# linear warm-up over the first epoch, then poly decay as in the recipe
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=1,
         convert_to_iter_based=True),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=True, begin=1,
         end=max_epochs, convert_to_iter_based=True),
]
