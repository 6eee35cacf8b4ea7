"""OCRNet (MMSegmentation's OCRHead on HRNet-18): object-contextual attention.

The constructs: ``SpatialGatherModule`` contracts soft class regions with
the pixel features (``softmax(probs) @ feats``: the class axis and the
feature channels meet in one product), ``ObjectAttentionBlock`` contracts
pixel queries with object keys (q and k are one group) and scales the
similarities by ``self.channels ** -0.5``, an attribute that must keep its
original value after pruning (the gated model uses the original width),
then concatenates the context with the features.

Issue 22 reported a 2.8e-4 difference on a random 50% plan at 256x256. It
is float32 rounding, not a rule: on the model's own initialisation (Kaiming
convs, BatchNorm statistics at mean 0 and variance 1) HRNet's activations
grow to ~1e7, the object attention's logits reach ~4e3, and a relative
rounding of 1e-6 in q and k moves them by ~5e-3, enough to change the
softmax weights of near-tied pixels. The gated and the pruned model are
then each ~1e-5 away from their own float64 values, and in float64 they
agree to 1e-13.
"""
import numpy as np
import torch

import cpd_mm  # noqa: F401
from cpd_mm.comb import comb_model
from cpd_mm.comb.verify import PlanChecker
from equivalence import assert_equivalent
from test_comb_openmmlab import upstream_config

OCRNET = 'mmseg::ocrnet/ocrnet_hr18_4xb2-40k_cityscapes-512x1024.py'
OCRNET_SMALL = 'mmseg::ocrnet/ocrnet_hr18s_4xb2-40k_cityscapes-512x1024.py'
OCB = 'decode_head.1.object_context_block'
SHAPE = (1, 3, 64, 64)


def build_ocrnet(seed, name=OCRNET):
    """The config's model with its own initialisation, seeded."""
    from mmengine.registry import MODELS, init_default_scope
    cfg = upstream_config(name)
    init_default_scope('mmseg')
    cfg.model.pretrained = None
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.eval()


def half_plan(comb, seed):
    """Half of every prunable group's free channels removed."""
    rng = np.random.default_rng(seed)
    kept = np.ones(comb.num_channels, dtype=bool)
    for g in comb.prunable_groups:
        free = np.nonzero(~g.frozen)[0]
        kept[g.channels[rng.choice(free, len(free) // 2, replace=False)]] = \
            False
    return kept


def test_ocrnet_object_context_exact():
    """Every OCR group pruned at random: gated == pruned in float64 (the
    same head on the small HRNet, for speed)."""
    model = build_ocrnet(3, OCRNET_SMALL)
    comb, kept, pruned, _ = assert_equivalent(
        model, SHAPE, 0.5, seed=3, dtype=torch.float64, tol=1e-9)
    # q and k are contracted together: one group, both producers
    qk = comb.group(f'{OCB}.query_project.1.conv')
    assert f'{OCB}.key_project.1.conv' in qk.producers
    # the head's features feed the pixel queries, the gathered object
    # context (keys and values) and the final concat
    feats = comb.group('decode_head.1.bottleneck.conv')
    assert {f'{OCB}.query_project.0.conv', f'{OCB}.key_project.0.conv',
            f'{OCB}.value_project.conv', f'{OCB}.bottleneck.conv'} <= set(
                feats.consumers)
    for g in (qk, feats, comb.group(f'{OCB}.value_project.conv')):
        assert g.prunable and not kept[g.channels].all(), g
    # soft class regions sit on their own axis of the gather product: the
    # first head's classes stay (pruning one would change every context)
    regions = comb.group('decode_head.0.conv_seg')
    assert regions.frozen.all() and any(
        'matmul keeps channels of both operands' in r
        for r in regions.reasons)
    # the similarity scale keeps the original width (the gated model's)
    ocb = pruned.decode_head[1].object_context_block
    assert ocb.channels == 256
    assert ocb.query_project[1].conv.out_channels == int(
        kept[qk.channels].sum())


def test_ocrnet_difference_on_own_weights_is_rounding():
    """The issue's symptom on a small input: above the float32 tolerance
    relative to the gated output, gone in float64 (below 1e-9): the verdict
    verification uses does not blame a group for it."""
    model = build_ocrnet(3)
    comb = comb_model(model, input_shape=SHAPE, verify=False)
    kept = half_plan(comb, 3)
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))
    # scored relative to the gated output alone, so that the float64
    # re-check is what tells rounding from a wrong group
    checker = PlanChecker(model, comb, x, None, 1e-5)
    assert checker.fails(kept) is None
    # the float32 difference it accepted (as rounding)
    diff = checker.max_difference
    assert diff > 1e-5, f'not the ill-conditioned case any more ({diff:.1e})'
