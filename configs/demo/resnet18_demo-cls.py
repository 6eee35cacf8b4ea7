"""Demo classifier: a narrow ResNet-18 (CIFAR stem) on the generated shapes.

Data: ``python tools/make_demo_data.py cls`` writes data/demo/cls (6 classes,
2000 train / 500 val images of 32x32, CustomDataset folder layout).
Train on CPU in about two and a half minutes (30 epochs, converged)::

    python tools/train.py configs/demo/resnet18_demo-cls.py
"""
_base_ = [
    'mmpretrain::_base_/models/resnet18_cifar.py',
    'mmpretrain::_base_/schedules/cifar10_bs128.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)
default_scope = 'mmpretrain'

num_classes = 6
# A quarter of ResNet-18's width (16..128 channels) keeps CPU training short.
model = dict(
    backbone=dict(stem_channels=16, base_channels=16),
    head=dict(num_classes=num_classes, in_channels=128))

data_root = 'data/demo/cls'
data_preprocessor = dict(
    num_classes=num_classes,
    mean=[127.5, 127.5, 127.5],
    std=[64.0, 64.0, 64.0],
    to_rgb=True)  # LoadImageFromFile reads BGR
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomCrop', crop_size=32, padding=4),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=64,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CustomDataset',
        data_root=data_root,
        data_prefix='train',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=128,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CustomDataset',
        data_root=data_root,
        data_prefix='val',
        pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# Cosine decay over 30 epochs (top-1 within 86-87.6 over the last six),
# validation every epoch.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=30,
    convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
auto_scale_lr = dict(base_batch_size=64)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=2,
        save_best='auto'))
randomness = dict(seed=0, deterministic=False)
