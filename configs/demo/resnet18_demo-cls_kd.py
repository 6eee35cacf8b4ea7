"""Demo classifier fine-tuned with knowledge distillation from itself.

The student is the demo ResNet-18; the teacher is a frozen copy of it taken
before training (``teacher='self'``), so both start from the trained
baseline. This is the distillation half of CPD without pruning (see
resnet18_demo-cls_prune.py for both). Train the baseline first, then::

    python tools/train.py configs/demo/resnet18_demo-cls_kd.py

Checkpoints hold ``student.*`` and ``teacher.*``; evaluate the student with
this config, or with the plain config through the ``student://`` prefix::

    python tools/test.py configs/demo/resnet18_demo-cls.py \
        student://work_dirs/resnet18_demo-cls_kd/epoch_4.pth
"""
_base_ = ['./resnet18_demo-cls.py']

distill_type = 'kl'  # the switch: 'kl' or 'none' for classifiers

# the trained baseline initialises the student and the 'self' teacher
load_from = 'work_dirs/resnet18_demo-cls/epoch_30.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill_type)

optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', by_epoch=True, T_max=4,
    convert_to_iter_based=True)
train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=1)
