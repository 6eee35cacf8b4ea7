"""PReLU's per-channel slopes are passengers of the channels they scale.

MMSegmentation's CGNet activates every ConvModule with ``nn.PReLU(C)``,
which reaches the dispatcher as ``_prelu_kernel(x, slope.view(1, C, 1,
1))``; the slope's channel axis is the one that meets x's axis 1.
"""
import cpd_mm  # noqa: F401
from equivalence import assert_equivalent
from test_comb_openmmlab import build, upstream_config

CGNET = 'mmseg::cgnet/cgnet_fcn_4xb8-60k_cityscapes-512x1024.py'


def test_cgnet_prelu_slopes_follow_their_channels():
    model = build(upstream_config(CGNET))
    comb, kept, pruned, _ = assert_equivalent(model, (1, 3, 64, 64), 0.5)
    # only the class logits stay: no slope freezes its channels
    assert set(comb.frozen_reasons()) == {'model output (in <model>)'}
    stem = comb.group('backbone.stem.0.conv')
    assert 'backbone.stem.0.activate.weight' in stem.passengers
    assert not kept[stem.channels].all()
    stem0 = pruned.backbone.stem[0]
    assert stem0.activate.weight.numel() == stem0.conv.out_channels == int(
        kept[stem.channels].sum())
