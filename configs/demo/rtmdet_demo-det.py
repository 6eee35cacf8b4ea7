"""Demo detector: a narrow RTMDet on the generated shapes (COCO format).

Data: ``python tools/make_demo_data.py det`` writes data/demo/det (1000 train
/ 200 val images of 96x96, 4 classes, COCO json). Train on CPU and evaluate
with COCO bbox mAP::

    python tools/train.py configs/demo/rtmdet_demo-det.py

Measured here: 32.5 bbox mAP (56.0 mAP@0.5) after the 12 epochs, in 13 min on
two cores shared with other jobs (load average 6-8).

What the demo changes in MMDetection's RTMDet-tiny config: a third of its
width (0.55 M parameters) and no ImageNet initialisation (nothing can be
downloaded), BatchNorm instead of SyncBN (one CPU process), 4 classes at
96x96 without mosaic/mix-up augmentation, and a 12-epoch schedule at batch
16 without EMA.
"""
_base_ = ['mmdet::rtmdet/rtmdet_tiny_8xb32-300e_coco.py']
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)

image_size = 96
num_classes = 4
norm_cfg = dict(type='BN')
model = dict(
    backbone=dict(widen_factor=0.125, norm_cfg=norm_cfg, init_cfg=None),
    neck=dict(in_channels=[32, 64, 128], out_channels=32,
              norm_cfg=norm_cfg),
    bbox_head=dict(num_classes=num_classes, in_channels=32, feat_channels=32,
                   norm_cfg=norm_cfg),
    test_cfg=dict(nms_pre=1000, score_thr=0.001, max_per_img=100))

dataset_type = 'CocoDataset'
data_root = 'data/demo/det/'
metainfo = dict(
    classes=('disk', 'square', 'triangle', 'ring'),
    palette=[(220, 20, 60), (0, 0, 230), (250, 170, 30), (0, 200, 90)])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                    'scale_factor')),
]
train_dataloader = dict(
    _delete_=True,
    batch_size=16,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=1),
        pipeline=train_pipeline))
val_dataloader = dict(
    _delete_=True,
    batch_size=32,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'), test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    _delete_=True, type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json', metric='bbox')
test_evaluator = val_evaluator

# 63 iterations per epoch
max_epochs = 12
base_lr = 0.004
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=100),
    dict(type='CosineAnnealingLR', eta_min=base_lr * 0.05, begin=0,
         end=max_epochs, T_max=max_epochs, by_epoch=True,
         convert_to_iter_based=True),
]
train_cfg = dict(
    _delete_=True, type='EpochBasedTrainLoop', max_epochs=max_epochs,
    val_interval=4)
custom_hooks = []  # upstream: EMA over 300 epochs, mosaic switch at 280
default_hooks = dict(
    logger=dict(interval=8),
    checkpoint=dict(interval=4, max_keep_ckpts=1, save_best='coco/bbox_mAP'))
log_processor = dict(window_size=8)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=16)
