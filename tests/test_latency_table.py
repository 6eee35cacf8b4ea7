"""Latency table: built by measuring with onnxruntime, cached, predicting.

Small nets at small inputs keep the measurements to a few seconds.
"""
import logging
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip('onnxruntime')

from cpd_mm.deploy import layer_timing  # noqa: E402
from cpd_mm.deploy.latency_table import LatencyTable  # noqa: E402
from cpd_mm.deploy.layer_specs import (discover_layers,  # noqa: E402
                                       interpolate, sample_widths)


class ConvNet(nn.Module):
    """conv, depthwise conv, pointwise conv, linear; widths as arguments
    so that a narrower copy keeps the module names (a 'pruned copy')."""

    def __init__(self, c1=16, c2=32, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, c1, 3, 2, 1)
        self.conv = nn.Conv2d(c1, c2, 3, 1, 1)
        self.dw = nn.Conv2d(c2, c2, 3, 1, 1, groups=c2)
        self.pw = nn.Conv2d(c2, c2, 1)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(x))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(x.mean((2, 3)))


class TinyViT(nn.Module):
    """Patch embedding, one pre-norm block with SDPA, a head."""

    def __init__(self, dim=32, heads=2, head_dim=16, hidden=64, classes=10):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(
            b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, -1))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))


CONV_SHAPE = (1, 3, 32, 32)
# 256 tokens: the attention core is timed well above the fixed overhead
VIT_SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp('latency_cache'))


@pytest.fixture(scope='module')
def conv_table(cache):
    torch.manual_seed(0)
    return LatencyTable.build(ConvNet().eval(), CONV_SHAPE, cache_dir=cache,
                              samples=3)


@pytest.fixture(scope='module')
def vit_table(cache):
    torch.manual_seed(0)
    return LatencyTable.build(TinyViT().eval(), VIT_SHAPE, cache_dir=cache,
                              samples=3)


def test_conv_table_layers_and_interpolation(conv_table):
    t = conv_table
    assert set(t.layers) == {'stem', 'conv', 'dw', 'pw', 'fc'}
    assert t.provider == 'CPUExecutionProvider' and t.threads == 1
    assert t.full_ms > 0
    for sid, s in t.data['specs'].items():
        name = next(n for n, ids in t.layers.items() if sid in ids)
        # exact at every sampled width
        for idx in np.ndindex(*np.shape(s['ms'])):
            point = [s['axes'][a][i] for a, i in enumerate(idx)]
            assert t.layer(name, *point) == pytest.approx(
                s['ms'][idx[0]][idx[1]] if len(idx) == 2 else s['ms'][idx[0]])
    # the image channels and the logits are never pruned: not sampled
    stem = t.data['specs'][t.layers['stem'][0]]
    fc = t.data['specs'][t.layers['fc'][0]]
    assert stem['axes'][0] == [3] and fc['axes'][1] == [10]
    # depthwise: one width
    assert len(t.data['specs'][t.layers['dw'][0]]['axes']) == 1
    # between samples the value lies between its neighbours' values, and the
    # biggest layer is clearly faster at a quarter of its widths
    axes = t.data['specs'][t.layers['conv'][0]]['axes']
    lo, hi = axes[1][-2], axes[1][-1]
    mid = t.layer('conv', 16, (lo + hi) // 2)
    a, b = t.layer('conv', 16, lo), t.layer('conv', 16, hi)
    assert min(a, b) <= mid <= max(a, b)
    assert t.layer('conv', 4, 8) < t.layer('conv', 16, 32)


def test_predict_and_pruned_copy(conv_table):
    t = conv_table
    full = t.full_widths()
    assert t.predict({}) == pytest.approx(t.full_ms)
    assert t.predict(full) == pytest.approx(t.full_ms)
    # default 'ratio': the measured model scaled by its summed layer times
    half = dict(full, conv=(8, 16), pw=(16, 16), dw=(16, ))
    summed = sum(t.layer(n, *half[n]) for n in t.layers)
    assert t.predict(half) == pytest.approx(t.scale * summed)
    assert t.predict(dict(half, dw=16)) == t.predict(half)  # one number
    saved = sum(t.layer(n, *full[n]) - t.layer(n, *half[n]) for n in t.layers)
    assert t.predict(half, 'difference') == pytest.approx(t.full_ms - saved)
    pruned = ConvNet(c1=8, c2=16).eval()
    widths = t.widths_of_model(pruned)
    assert widths['conv'] == (8, 16) and widths['dw'] == (16, )
    assert t.predict_model(pruned) < t.full_ms
    assert t.predict_model(pruned) == pytest.approx(t.predict(widths))
    with pytest.raises(KeyError, match='neither layers'):
        t.predict({'nope': (1, 1)})


def test_second_build_is_a_cache_hit(conv_table, cache, monkeypatch):
    calls = []
    real = layer_timing.LayerTimer.time_graphs
    monkeypatch.setattr(layer_timing.LayerTimer, 'time_graphs',
                        lambda self, g: calls.append(len(g)) or real(self, g))
    torch.manual_seed(1)  # other weights, same structure: same table
    again = LatencyTable.build(ConvNet().eval(), CONV_SHAPE, cache_dir=cache,
                               samples=3)
    assert calls == []
    assert again.data == conv_table.data
    # a damaged cache file is measured again, with a logged reason
    path = os.path.join(cache, f'ConvNet-{conv_table.data["key"]}.json')
    with open(path, 'w') as f:
        f.write('{"format": "cpd_mm.latency_table/v1", "specs"')
    LatencyTable.build(ConvNet().eval(), CONV_SHAPE, cache_dir=cache,
                       samples=3)
    assert calls
    calls.clear()
    # another input size is another table: measured
    LatencyTable.build(ConvNet().eval(), (1, 3, 16, 16), cache_dir=cache,
                       samples=2)
    assert calls and sum(calls) > 0


def test_vit_attention_core(vit_table):
    t = vit_table
    assert t.attention_keys == ['']  # SDPA called by the root module
    assert t.full_widths()[''] == (2, 16, 16)
    assert {'patch', 'qkv', 'proj', 'fc1', 'fc2', 'head'} <= set(t.layers)
    full = t.attention('', 2, 16, 16)
    assert 0 < t.attention('', 1, 8, 8) < full
    pruned = TinyViT(heads=2, head_dim=8, hidden=32).eval()
    w = t.widths_of_model(pruned)
    assert w[''] == (2, 8, 8) and w['fc1'] == (32, 32)
    assert t.predict_model(pruned) < t.full_ms


def test_provider_fallback_is_logged(conv_table, cache, caplog):
    logger = logging.getLogger('cpd_mm.test_latency')
    with caplog.at_level(logging.WARNING, logger=logger.name):
        t = LatencyTable.build(ConvNet().eval(), CONV_SHAPE, cache_dir=cache,
                               samples=3, logger=logger,
                               providers=['NoSuchExecutionProvider'])
    assert t.provider == 'CPUExecutionProvider'
    assert any('NoSuchExecutionProvider' in r.getMessage() and
               'not in this onnxruntime build' in r.getMessage()
               for r in caplog.records)


def test_restricted_table(cache):
    t = LatencyTable.build(ConvNet().eval(), CONV_SHAPE, cache_dir=cache,
                           samples=2, layers=['conv'])
    assert list(t.layers) == ['conv']
    # the rest of the model is not scaled: 'difference' by default
    saved = t.layer('conv', 16, 32) - t.layer('conv', 4, 8)
    assert t.predict({'conv': (4, 8)}) == pytest.approx(t.full_ms - saved)


def test_interpolation_and_sampling():
    axes, ms = [[8, 16, 32], [8, 64]], [[1.0, 2.0], [2.0, 4.0], [4.0, 8.0]]
    assert interpolate(axes, ms, (16, 64)) == 4.0  # a sample
    assert interpolate(axes, ms, (24, 36)) == pytest.approx(4.5)  # bilinear
    assert interpolate(axes, ms, (4, 8)) == pytest.approx(0.5)  # extended
    assert interpolate(axes, ms, (0, 8)) == 0.0  # clipped at 0
    assert sample_widths(64) == [8, 16, 32, 48, 64]
    assert sample_widths(2048, samples=4) == [512, 1024, 1536, 2048]
    assert sample_widths(12) == [2, 3, 6, 9, 12]  # too narrow for blocks
    assert sample_widths(128, unit=32) == [32, 64, 96, 128]  # 32 groups


def test_uncovered_modules_are_reported():
    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            x = self.proj(x)
            return self.mha(x, x, x)[0]

    m, x = WithMHA().eval(), torch.randn(1, 5, 3)
    found = discover_layers(m, lambda: m(x), x)
    assert found['uncovered'] == ['mha'] and list(found['layers']) == ['proj']
    assert found['layers']['proj'][0]['fixed_in']  # reads the model input


def test_bound_runner_runs_the_graph(tmp_path):
    # the GPU timing path (IO binding), exercised with CPU memory
    from cpd_mm.deploy import create_session
    m, x = nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8)
    path = layer_timing.export_graph(m, [x], str(tmp_path / 'conv.onnx'))
    session = create_session(path, ['CPUExecutionProvider'], 1)
    run = layer_timing.bound_runner(session, {'input0': x.numpy()}, 'cpu')
    run()
    out = run.binding.copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(out, m(x).detach().numpy(), atol=1e-5)
    wall, cpu = layer_timing.time_sessions([session], [{'input0': x.numpy()}],
                                           3)[0]
    assert wall.shape == cpu.shape == (3, ) and (wall > 0).all()


def test_bad_input():
    with pytest.raises(ValueError, match='input_shape'):
        LatencyTable.build(ConvNet(), (3, 32), cache_dir=False)
    with pytest.raises(ValueError, match="'nope'"):
        LatencyTable.build(ConvNet(), CONV_SHAPE, layers=['nope'],
                           cache_dir=False)


def test_int8_table_times_quantized_graphs(conv_table, vit_table, cache,
                                           monkeypatch):
    """precision='int8': every timed graph (layers at each width, attention
    cores, the whole model) is a quantized one, the table says so, and it
    is cached apart from the FP32 table."""
    from cpd_mm.deploy.quantize import quantization_summary
    timed = []
    real = layer_timing.LayerTimer.time_graphs

    def spy(self, graphs):
        timed.extend(quantization_summary(p) for p, _ in graphs)
        return real(self, graphs)

    monkeypatch.setattr(layer_timing.LayerTimer, 'time_graphs', spy)
    full = []
    real_full = layer_timing._FullModel.__init__

    def spy_full(self, fwd, example, timer, precision='fp32'):
        full.append(precision)
        real_full(self, fwd, example, timer, precision)

    monkeypatch.setattr(layer_timing._FullModel, '__init__', spy_full)
    for net, shape, fp32 in ((ConvNet(), CONV_SHAPE, conv_table),
                             (TinyViT(), VIT_SHAPE, vit_table)):
        t = LatencyTable.build(net.eval(), shape, cache_dir=cache,
                               samples=2,
                               precision='int8')
        assert t.precision == 'int8' and fp32.precision == 'fp32'
        assert t.data['key'] != fp32.data['key']
        assert set(t.full_widths()) == set(fp32.full_widths())
    assert full == ['int8', 'int8']
    assert timed and all(s['quantized_compute_nodes'] >= 1 and
                         not s['fp32_compute_nodes'] for s in timed)
    n = len(timed)
    again = LatencyTable.build(TinyViT().eval(), VIT_SHAPE, cache_dir=cache,
                               samples=2, precision='int8')
    assert len(timed) == n and again.precision == 'int8'  # a cache hit
    with pytest.raises(ValueError, match="'int4'"):
        LatencyTable.build(ConvNet(), CONV_SHAPE, cache_dir=False,
                           precision='int4')
