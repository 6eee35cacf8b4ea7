"""Demo segmenter fine-tuned with channel-wise distillation from itself.

The student is the demo PSPNet; the teacher is a frozen copy of it taken
before training (``teacher='self'``), both initialised from the trained
baseline. ``distill_type`` is the one line of the paper's ablation: 'cwd'
(channel-wise distillation of the logits), 'cirkd' (logit KD + cross-image
relations of the decode head's embeddings), 'kl' (per-pixel logit KD) or
'none'. Train the baseline first, then::

    python tools/train.py configs/demo/pspnet_r18_demo-seg_cwd.py

(``--cfg-options model.distill=cirkd`` switches without editing the file.)

Evaluate the student with this config, or with the plain config through the
``student://`` prefix of the checkpoint path.
"""
_base_ = ['./pspnet_r18_demo-seg.py']

distill_type = 'cwd'  # the switch: 'cwd', 'cirkd', 'kl' or 'none'

# the trained baseline initialises the student and the 'self' teacher
load_from = 'work_dirs/pspnet_r18_demo-seg/epoch_20.pth'
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill_type)

max_epochs = 4
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_epochs,
         by_epoch=True, convert_to_iter_based=True)
]
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=5e-4))
train_cfg = dict(max_epochs=max_epochs, val_interval=1)
