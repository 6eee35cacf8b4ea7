"""INT8 export: onnxruntime static quantization calibrated on the config's
own data, FP32 fall-back per node (by name or measured sensitivity),
verification against FP32, and never an INT8-named file that is not INT8.
"""
import importlib.util
import json
import logging
import os.path as osp

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime.quantization')

from cpd_mm.apis import init_model  # noqa: E402
from cpd_mm.deploy import export_int8, quantization_summary  # noqa: E402
from cpd_mm.deploy.layer_timing import export_graph  # noqa: E402
from cpd_mm.deploy.quantize import (QuantizationError,  # noqa: E402
                                    compute_nodes, quantize_onnx)
from cpd_mm.deploy.verify import VerificationError  # noqa: E402

from deploy_helpers import (DEMO_CLS, DEMO_SEG, REPO,  # noqa: E402
                            data_config, generic_weights, save_checkpoint)


@pytest.fixture(scope='module')
def tool():
    path = osp.join(REPO, 'tools', 'export_onnx.py')
    spec = importlib.util.spec_from_file_location('export_onnx_int8', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def op_types(path):
    return [n.op_type for n in onnx.load(path).graph.node]


def images(n, shape=(1, 3, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


class ConvChain(nn.Module):
    """conv -> relu -> conv -> relu -> 1x1 conv. ``outlier`` scales the
    last conv's first output channel: per-tensor quantization of that
    output then rounds the other channels away, and only keeping the last
    conv in FP32 repairs it."""

    def __init__(self, outlier=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.conv3.weight[0] *= outlier
            self.conv3.bias[0] *= outlier

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


class EinsumMix(nn.Module):
    """A channel mix written as einsum, which onnxruntime does not
    quantize; ``with_conv`` puts a quantizable conv in front."""

    def __init__(self, with_conv):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1) if with_conv else None
        self.mix = nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        if self.conv is not None:
            x = self.conv(x)
        return torch.einsum('nchw,oc->nohw', x, self.mix)


def fp32_graph(module, tmp_path, name='fp32.onnx'):
    return export_graph(module.eval(), [torch.randn(1, 3, 16, 16)],
                        str(tmp_path / name))


def test_demo_classifier_int8_from_its_own_data(tool, tmp_path, capsys,
                                                 tiny_cls_data):
    """The tool calibrates on the config's train images (24 here, fewer than
    asked: logged), quantizes every compute node, verifies against FP32 on
    the val images, and reports it all."""
    cfg = data_config(tmp_path, DEMO_CLS, tiny_cls_data)
    # a random network's features barely differ between images: INT8
    # noise swamps its predictions, so agreement is reported, not required
    ckpt = save_checkpoint(generic_weights(init_model(cfg, device='cpu')),
                           tmp_path / 'cls.pth')
    out, js = tmp_path / 'cls_int8.onnx', tmp_path / 'r.json'
    assert tool.main([cfg, ckpt, '--int8', '--calib', '100', '--verify',
                      '--min-agreement', '0', '--out', str(out),
                      '--json', str(js)]) == 0
    log = capsys.readouterr()
    assert 'has 24: using all 24' in log.out + log.err
    report = json.loads(js.read_text())
    q = report['int8']
    assert report['precision'] == 'int8' and q['calib_images'] == 24
    assert q['quantized_compute_nodes'] == q['compute_nodes'] > 10
    assert q['fp32_compute_nodes'] == []
    assert 'QuantizeLinear' in op_types(str(out))
    assert report['verify']['fp32']['passed']
    v = report['verify']['int8']
    assert v['images'] == 12 and v['passed']
    assert 0 <= v['argmax_agreement'] <= 1 and v['relative_error'] > 0


def test_segmenter_pixel_agreement(tmp_path, tiny_seg_data):
    cfg = data_config(tmp_path, DEMO_SEG, tiny_seg_data)
    model = generic_weights(init_model(cfg, device='cpu'))
    out = str(tmp_path / 'seg_int8.onnx')
    result = export_int8(model, out, (64, 64), calib=8, verify=True,
                         min_agreement=0.5)
    v = result['verify']
    assert v['images'] == 4 and 0.5 <= v['argmax_agreement'] <= 1
    assert result['int8']['quantized_compute_nodes'] > 0
    assert osp.isfile(out)


def test_no_val_loader_verifies_on_calibration_images(tmp_path, caplog,
                                                      tiny_cls_data):
    cfg = data_config(tmp_path, DEMO_CLS, tiny_cls_data,
                      extra='val_dataloader = None\nval_cfg = None\n'
                      'val_evaluator = None')
    model = init_model(cfg, device='cpu')
    logger = logging.getLogger('cpd_mm.test_int8')
    with caplog.at_level(logging.WARNING, logger=logger.name):
        result = export_int8(model, str(tmp_path / 'q.onnx'), (32, 32),
                             calib=6, verify=True, min_agreement=0,
                             logger=logger)
    assert result['verify']['images'] == 6
    assert any('no val_dataloader' in r.getMessage() and
               'calibration images instead' in r.getMessage()
               for r in caplog.records)


def test_no_calibration_loader_is_a_clear_error(tool, tmp_path, capsys,
                                                tiny_cls_data):
    cfg = data_config(tmp_path, DEMO_CLS, tiny_cls_data,
                      extra='train_dataloader = None\ntrain_cfg = None')
    ckpt = save_checkpoint(init_model(cfg, device='cpu'),
                           tmp_path / 'c.pth')
    out = tmp_path / 'q.onnx'
    assert tool.main([cfg, ckpt, '--int8', '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'no train_dataloader' in err and '--calib-split' not in err
    assert 'Traceback' not in err and not out.exists()


def test_unquantizable_op_writes_no_int8_file(tmp_path):
    """Einsum has no quantized kernel: a graph of nothing else is refused,
    a graph with a quantizable conv too is quantized and the Einsum left in
    FP32 is logged."""
    src = fp32_graph(EinsumMix(with_conv=False), tmp_path)
    out = tmp_path / 'q.onnx'
    with pytest.raises(QuantizationError, match='quantized none'):
        quantize_onnx(src, str(out), images(4))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.q')]

    src = fp32_graph(EinsumMix(with_conv=True), tmp_path, 'mixed.onnx')
    info = quantize_onnx(src, str(out), images(4), logger='current')
    einsum = [n for n in compute_nodes(src) if 'Einsum' in n]
    assert info['fp32_compute_nodes'] == einsum
    assert info['quantized_compute_nodes'] == 1


def test_fp32_nodes_by_name(tmp_path):
    src = fp32_graph(ConvChain(), tmp_path)
    names = compute_nodes(src)
    with pytest.raises(QuantizationError, match='not nodes of the FP32'):
        quantize_onnx(src, str(tmp_path / 'q.onnx'), images(4),
                      fp32_nodes=['no_such_node'])
    info = quantize_onnx(src, str(tmp_path / 'q.onnx'), images(4),
                         fp32_nodes=[names[1]])
    summary = quantization_summary(str(tmp_path / 'q.onnx'))
    assert summary['fp32_compute_nodes'] == [names[1]]
    assert info['quantized_compute_nodes'] == len(names) - 1


def test_auto_fp32_keeps_the_sensitive_node(tmp_path):
    src = fp32_graph(ConvChain(outlier=1e4), tmp_path)
    names = compute_nodes(src)
    info = quantize_onnx(src, str(tmp_path / 'q.onnx'), images(16),
                         auto_fp32=1)
    assert info['auto_fp32_nodes'] == [names[-1]]  # the outlier conv
    gains = info['sensitivity']
    assert gains[names[-1]] > 10 * max(gains[n] for n in names[:-1])
    assert info['fp32_compute_nodes'] == [names[-1]]


@pytest.mark.parametrize('method', ['minmax', 'entropy', 'percentile'])
def test_calibration_methods(tmp_path, method):
    src = fp32_graph(ConvChain(), tmp_path)
    info = quantize_onnx(src, str(tmp_path / 'q.onnx'), images(8),
                         method=method)
    assert info['method'] == method
    assert info['quantized_compute_nodes'] == 3


def test_failed_verification_writes_nothing(tmp_path):
    """The outlier chain quantized whole disagrees with FP32 on most
    pixels: a verification asking for full agreement fails and the INT8
    file is not published."""
    from cpd_mm.deploy import verify_int8
    src = fp32_graph(ConvChain(outlier=1e4), tmp_path)
    out = tmp_path / 'q.onnx'

    def check(path):
        verify_int8(src, path, images(4, seed=1), min_agreement=1.0)

    with pytest.raises(VerificationError, match='INT8 verification FAILED'):
        quantize_onnx(src, str(out), images(8), before_publish=check)
    assert not out.exists()


def fused_ops(path, tmp_path):
    """Op types after onnxruntime's graph optimisation: what really runs."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return op_types(options.optimized_model_filepath)


def test_shared_zero_biases_still_run_integer_kernels(tmp_path):
    """Freshly initialised BatchNorms fold into equal (zero) conv biases,
    which the exporter shares through Identity nodes; every conv must still
    become an integer kernel (a float bias blocks the fusion)."""
    from cpd_mm.deploy import export_onnx
    model = init_model(DEMO_CLS, device='cpu')  # fresh BN: zero biases
    src = str(tmp_path / 'fp32.onnx')
    export_onnx(model, src, (32, 32))
    assert 'Identity' in op_types(src)  # the sharing this test is about
    info = quantize_onnx(src, str(tmp_path / 'q.onnx'),
                         images(4, (1, 3, 32, 32)))
    assert info['fp32_compute_nodes'] == []
    ops = fused_ops(str(tmp_path / 'q.onnx'), tmp_path)
    assert ops.count('QLinearConv') == op_types(src).count('Conv')
    assert 'Conv' not in ops


def test_calibration_images_cover_the_classes(tmp_path, tiny_cls_data):
    """The demo set lists its images class by class: N images are drawn
    evenly over it, not the first N (one class)."""
    from cpd_mm.deploy.data import build_loader
    cfg = init_model(data_config(tmp_path, DEMO_CLS, tiny_cls_data),
                     device='cpu').cfg
    loader, _, n = build_loader(cfg, 'train', 6, test_pipeline=True)
    labels = [int(s.gt_label[0]) for b in loader for s in b['data_samples']]
    assert n == 6 and sorted(labels) == list(range(6))


def activation_scales(path):
    from onnx import numpy_helper
    return {i.name: float(numpy_helper.to_array(i))
            for i in onnx.load(path).graph.initializer
            if i.name.endswith('_scale') and not i.dims}


def test_entropy_and_percentile_clip_outliers(tmp_path):
    """With a heavy-tailed input, entropy and percentile calibration clip
    activation ranges below min-max (onnxruntime's entropy defaults could
    only return the min-max range)."""
    src = fp32_graph(ConvChain(), tmp_path)
    rng = np.random.default_rng(0)
    calib = [rng.standard_t(2, (1, 3, 16, 16)).astype(np.float32)
             for _ in range(16)]
    scales = {}
    for method in ('minmax', 'entropy', 'percentile'):
        quantize_onnx(src, str(tmp_path / f'{method}.onnx'), calib,
                      method=method, percentile=99.9)
        scales[method] = activation_scales(str(tmp_path / f'{method}.onnx'))
    for method in ('entropy', 'percentile'):
        smaller = [k for k in scales['minmax']
                   if scales[method][k] < 0.9 * scales['minmax'][k]]
        assert smaller, method
