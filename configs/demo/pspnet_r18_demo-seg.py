"""Demo segmenter: PSPNet with a narrow ResNetV1c-18 on the generated scenes.

Data: ``python tools/make_demo_data.py seg`` writes data/demo/seg in the
ADE20K layout (images/{training,validation}/*.jpg, annotations/.../*.png,
label 0 unlabelled, 1 background, 2..5 objects; 600 train / 150 val, 64x64).
Train on CPU in a few minutes::

    python tools/train.py configs/demo/pspnet_r18_demo-seg.py
"""
_base_ = [
    'mmseg::_base_/models/pspnet_r50-d8.py',
    'mmseg::_base_/default_runtime.py',
]
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)
default_scope = 'mmseg'

crop_size = (64, 64)
num_classes = 5  # labels 1..5 of the files, 0..4 after reduce_zero_label
norm_cfg = dict(type='BN', requires_grad=True)  # single-process CPU
data_preprocessor = dict(size=crop_size)
# A quarter of ResNet-18's width (16..128 channels), no pretrained weights
# (nothing can be downloaded), output stride 8 as in the upstream PSPNet.
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        depth=18, stem_channels=16, base_channels=16, norm_cfg=norm_cfg),
    decode_head=dict(
        in_channels=128, channels=32, num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=64, channels=16, num_classes=num_classes,
        norm_cfg=norm_cfg))

# ADE20K layout and conventions, but ADE20KDataset cannot be used: its 150
# hard-coded class names would remap our labels. BaseSegDataset reads the
# same layout with our class names.
dataset_type = 'BaseSegDataset'
data_root = 'data/demo/seg'
metainfo = dict(
    classes=('background', 'disk', 'square', 'triangle', 'ring'),
    palette=[[120, 120, 120], [220, 20, 60], [0, 0, 230], [250, 170, 30],
             [0, 200, 90]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        metainfo=metainfo,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        metainfo=metainfo,
        data_root=data_root,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        img_suffix='.jpg',
        seg_map_suffix='.png',
        reduce_zero_label=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# Epoch-based short schedule (upstream mmseg schedules are 20k+ iterations).
max_epochs = 20
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4),
    clip_grad=None)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_epochs,
         by_epoch=True, convert_to_iter_based=True)
]
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=True),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=True, interval=1, max_keep_ckpts=2,
        save_best='mIoU'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
log_processor = dict(by_epoch=True)
randomness = dict(seed=0, deterministic=False)
