"""CPD on RetinaNet-R50-FPN (COCO): prune 50% of the parameters while
fine-tuning with distillation from the unpruned detector.

    python tools/train.py configs/cpd/retinanet_r50_fpn_coco_prune.py
    python tools/test.py mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        work_dirs/retinanet_r50_fpn_coco_prune/pruned_final.pth

``load_from`` is the MMDetection model-zoo checkpoint (36.5 box AP); it is
downloaded on first use. The 1x schedule of the upstream config is kept: the
hook prunes during its first 3 epochs and the rest fine-tunes the pruned
structure. No COCO run was possible where this config was written: the
schedule is a starting point, not a tuned recipe.
"""
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)

# ----------------------------------------------------------------- CPD ---
target_sparsity = 0.5     # fraction of parameters removed: edit this line
distill = 'kl'            # 'kl' (per-class binary KL of the class maps),
#                           'cwd' (channel-wise, FPN levels) or 'none'
importance = 'hessian'    # 'hessian' (paper), 'taylor', 'l1', 'random'
round_to = 8              # channel counts in multiples of 8 (1: exact)

load_from = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'  # noqa
model = dict(
    _delete_=True,
    type='CPDDistiller',
    student={{_base_.model}},
    teacher='self',
    distill=distill)

# 7330 iterations per epoch at 8x2 images: prune every 200 iterations until
# iteration 20000 (about 3 epochs). The channel structure does not depend on
# the resolution, so a small example input keeps combing cheap.
custom_hooks = [
    dict(
        type='CPDPruningHook',
        target_sparsity=target_sparsity,
        importance=importance,
        round_to=round_to,
        interval=200,
        begin_iter=200,
        end_iter=20000,
        input_shape=(1, 3, 256, 256)),
]
