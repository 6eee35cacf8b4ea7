"""INT8 static quantization of an exported graph with onnxruntime.

The graph becomes a QDQ graph (``QuantizeLinear`` / ``DequantizeLinear``
around the quantized ops, which onnxruntime fuses into integer kernels):
weights per output channel and symmetric, activations calibrated on images
(:mod:`cpd_mm.deploy.data`). ``target`` picks the activation type the
runtime prefers: ``'cpu'`` (x86 / ARM CPU provider, OpenVINO) uint8
asymmetric activations, ``'gpu'`` (TensorRT, CUDA) int8 symmetric ones.

A file is only published under its name when quantization really happened:
:func:`quantization_summary` counts the quantized compute nodes of the
result and :func:`quantize_onnx` refuses a graph without any.
"""
import contextlib
import inspect
import io
import logging
import os
import os.path as osp
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from mmengine.logging import print_log

from .atomic import atomic_output, check_output_path
from .benchmark import create_session, require_onnxruntime

__all__ = ['QuantizationError', 'CALIBRATION_METHODS', 'TARGETS',
           'COMPUTE_OPS', 'quantization_summary', 'quantize_onnx',
           'quantize_for_timing', 'compute_nodes', 'output_error']

#: calibration methods by their command-line name
CALIBRATION_METHODS = {'minmax': 'MinMax', 'entropy': 'Entropy',
                       'percentile': 'Percentile'}
TARGETS = ('cpu', 'gpu')
#: ops that carry the compute of a vision model (what INT8 is for)
COMPUTE_OPS = ('Conv', 'ConvTranspose', 'MatMul', 'Gemm', 'Einsum')
_INTEGER_OPS = ('QLinearConv', 'QLinearMatMul', 'ConvInteger',
                'MatMulInteger', 'QGemm')


class QuantizationError(RuntimeError):
    """Quantization did not produce an INT8 graph (nothing quantized, an
    unknown node name, no calibration data)."""


def _load(model):
    import onnx
    return onnx.load(model) if isinstance(model, str) else model


def compute_nodes(model) -> List[str]:
    """Names of the :data:`COMPUTE_OPS` nodes of an (FP32) graph."""
    return [n.name for n in _load(model).graph.node
            if n.op_type in COMPUTE_OPS]


def quantization_summary(model) -> dict:
    """What is quantized in a graph (a path or ``onnx.ModelProto``).

    A compute node counts as quantized when every input it reads (weight
    and bias included) is produced by a ``DequantizeLinear`` (QDQ graphs),
    or when it is an integer op itself.

    Returns:
        dict: ``quantize_linear``, ``dequantize_linear``, ``integer_ops``
        (counts), ``compute_nodes``, ``quantized_compute_nodes``,
        ``fp32_compute_nodes`` (names of those left in float).
    """
    graph = _load(model).graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    fp32 = []
    total = 0
    for n in graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        total += 1
        # activation, weight and bias must all come through a DQ (the bias
        # as int32): a float input keeps onnxruntime from fusing the group
        # into an integer kernel
        reads = [i for i in n.input if i]
        if not all(i in producer and producer[i].op_type ==
                   'DequantizeLinear' for i in reads if i not in weights):
            fp32.append(n.name)
        elif any(i in weights for i in reads):  # a float weight read as is
            fp32.append(n.name)
    integer = sum(ops.count(op) for op in _INTEGER_OPS)
    return dict(quantize_linear=ops.count('QuantizeLinear'),
                dequantize_linear=ops.count('DequantizeLinear'),
                integer_ops=integer,
                compute_nodes=total + integer,
                quantized_compute_nodes=total - len(fp32) + integer,
                fp32_compute_nodes=fp32)


class _Reader:
    """onnxruntime ``CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict]):
        self._feeds = [{k: np.ascontiguousarray(a, np.float32)
                        for k, a in f.items()} for f in feeds]
        self._i = 0

    def get_next(self):
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def __len__(self):
        return len(self._feeds)

    def rewind(self):
        self._i = 0


def _reader(feeds):
    from onnxruntime.quantization import CalibrationDataReader
    cls = type('ArrayReader', (_Reader, CalibrationDataReader), {})
    return cls(feeds)


def _inline_identities(src: str, dst: str) -> str:
    """Replace ``Identity`` nodes that copy an initializer by a copy of it.

    The exporter shares equal constants (e.g. the zero biases of freshly
    folded BatchNorms) through Identity nodes; the quantizer only quantizes
    a bias that is an initializer, and a float bias blocks the integer
    kernel."""
    import onnx
    model = onnx.load(src)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.op_type == 'Identity'
                 and n.input[0] in inits]:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    onnx.save(model, dst)
    return dst


def _preprocess(src: str, tmp: str, logger) -> str:
    """Shape inference for the quantizer (node names kept: no graph
    optimisation here, so ``fp32_nodes`` name the FP32 graph's nodes)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    src = _inline_identities(src, osp.join(tmp, 'inlined.onnx'))
    dst = osp.join(tmp, 'pre.onnx')
    try:
        quant_pre_process(src, dst, skip_optimization=True)
        return dst
    except Exception as exc:  # symbolic shape inference fails on some ops
        print_log(f'int8: shape inference before quantization failed '
                  f'({type(exc).__name__}: {exc}); quantizing the graph as '
                  'exported', logger=logger, level=30)
        return src


def _calibrate(src, reader, method, target, percentile, cache, tmp):
    """Activation ranges of ``src`` on ``reader``'s images, saved to
    ``cache`` (onnxruntime's calibration cache: every later quantization
    of ``src`` reuses them).

    onnxruntime's defaults are not used as they are: its entropy
    calibrator's 128 histogram bins for 128 quantized bins leave a single
    candidate threshold, the min-max one; 2048 bins (TensorRT's setting)
    let it clip. Its percentile calibrator is symmetric by default, which
    wastes half the uint8 range on non-negative (ReLU) tensors."""
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import (create_calibrator,
                                                    save_tensors_data)
    from onnxruntime.quantization.registry import (QDQRegistry,
                                                   QLinearOpsRegistry)
    options = dict(symmetric=target == 'gpu')
    if method == 'entropy':
        options.update(num_bins=2048, num_quantized_bins=128)
    elif method == 'percentile':
        options.update(num_bins=2048, percentile=percentile)
    calibrator = create_calibrator(
        Path(src), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
        augmented_model_path=osp.join(tmp, 'augmented.onnx'),
        calibrate_method=getattr(CalibrationMethod,
                                 CALIBRATION_METHODS[method]),
        extra_options=options)
    reader.rewind()
    calibrator.collect_data(reader)
    with contextlib.redirect_stdout(io.StringIO()):  # histogram chatter
        ranges = calibrator.compute_data()
    save_tensors_data(ranges, cache)
    del calibrator


def _supports_cache():
    from onnxruntime.quantization import quantize_static
    return 'calibration_cache_path' in inspect.signature(
        quantize_static).parameters


def _quantize(src, dst, reader, method, target, exclude, cache, percentile):
    """quantize_static with the project's settings; ``cache``: ranges from
    :func:`_calibrate` (else onnxruntime calibrates on ``reader``)."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    sym = target == 'gpu'
    extra = dict(WeightSymmetric=True, ActivationSymmetric=sym,
                 CalibTensorRangeSymmetric=sym)
    if method == 'percentile':
        extra['CalibPercentile'] = percentile
    kwargs = dict(
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8 if sym else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod,
                                 CALIBRATION_METHODS[method]),
        nodes_to_exclude=list(exclude), extra_options=extra)
    if cache:
        kwargs['calibration_cache_path'] = cache
        reader = None
    else:
        reader.rewind()
    # the quantizer warns on the root logger about every tensor it skips
    # (LayerNorm weights, shared biases): the summary reports what counts
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(src, dst, reader, **kwargs)
    finally:
        root.setLevel(level)


def quantize_for_timing(src: str, dst: str, feeds: Sequence[dict],
                        target: str = 'cpu') -> str:
    """Quantize a graph as :func:`quantize_onnx` does (minmax on ``feeds``,
    no checks): for latency, where values do not matter but the kernels
    do (:mod:`cpd_mm.deploy.latency_table` with ``precision='int8'``). A
    node onnxruntime cannot quantize stays FP32, as in a deployed model."""
    with tempfile.TemporaryDirectory(prefix='cpd_mm_int8_') as tmp:
        src = _preprocess(src, tmp, 'silent')
        _quantize(src, dst, _reader(feeds), 'minmax', target, (), None,
                  99.999)
    return dst


def output_error(reference: Sequence[List[np.ndarray]],
                 outputs: Sequence[List[np.ndarray]]) -> float:
    """Quantization error of ``outputs`` against ``reference`` (per image,
    the list of graph outputs): per output and channel (axis 1), the mean
    squared error over images and positions relative to the reference's
    variance there, averaged. 0 is exact, 1 is as wrong as predicting the
    channel mean; a channel of small values counts as much as a large one
    (a few large logits would otherwise hide the loss of all others)."""
    errors = []
    for k in range(len(reference[0])):
        ref = np.stack([r[k] for r in reference]).astype(np.float64)
        out = np.stack([o[k] for o in outputs]).astype(np.float64)
        # [images, batch, channels, ...] -> channels first
        ref, out = (np.moveaxis(a, 2, 0).reshape(a.shape[2], -1)
                    if a.ndim > 2 else a.reshape(1, -1) for a in (ref, out))
        mse = ((out - ref) ** 2).mean(axis=1)
        var = ref.var(axis=1)
        errors.append(mse / np.maximum(var, 1e-12 + 1e-6 * var.max()))
    return float(np.concatenate(errors).mean())


def _sensitivity(src, reader, method, target, exclude, cache, percentile,
                 arrays, tmp, logger) -> Dict[str, float]:
    """Per compute node: how much the output error drops when only that
    node stays FP32 (one quantization each; calibration is cached)."""
    def run(path):
        session = create_session(path, ['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return [session.run(None, {name: x}) for x in arrays]

    refs = run(src)
    path = osp.join(tmp, 'probe.onnx')

    def error(excluded):
        _quantize(src, path, reader, method, target, excluded, cache,
                  percentile)
        return output_error(refs, run(path))

    base = error(exclude)
    candidates = [n for n in compute_nodes(src) if n not in exclude]
    gains = {n: base - error(list(exclude) + [n]) for n in candidates}
    print_log(f'int8: sensitivity of {len(candidates)} nodes measured on '
              f'{len(arrays)} calibration images (relative error of the '
              f'fully quantized graph {base:.3g})', logger=logger)
    return gains


def quantize_onnx(fp32_path: str, out: str,
                  calib_images: Sequence[np.ndarray],
                  method: str = 'minmax', target: str = 'cpu',
                  fp32_nodes: Sequence[str] = (), auto_fp32: int = 0,
                  sensitivity_images: int = 32, percentile: float = 99.999,
                  force: bool = False,
                  before_publish: Optional[Callable[[str], None]] = None,
                  logger=None) -> dict:
    """Quantize the FP32 graph ``fp32_path`` to an INT8 QDQ graph at
    ``out``.

    Args:
        fp32_path: an FP32 graph with one image input.
        out: the INT8 graph; written only when quantization happened and
            ``before_publish`` (e.g. a verification) passed.
        calib_images: calibration inputs, arrays of the graph's input shape.
        method: 'minmax', 'entropy' or 'percentile' (``percentile`` of the
            absolute values).
        target: 'cpu' or 'gpu', see the module docstring.
        fp32_nodes: node names of the FP32 graph to keep in FP32.
        auto_fp32: also keep the ``auto_fp32`` nodes in FP32 whose
            quantization costs most (output error on up to
            ``sensitivity_images`` calibration images).

    Returns:
        dict: ``path``, ``method``, ``target``, ``calib_images``,
        ``fp32_nodes`` (all kept in FP32 on purpose), ``auto_fp32_nodes``,
        ``sensitivity`` (node -> error drop, when measured), the
        :func:`quantization_summary` and ``size_bytes``.

    Raises:
        QuantizationError: no calibration image, an unknown node name, or a
            result without any quantized compute node.
        FileExistsError: ``out`` exists and not ``force``.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f'calibration method must be one of '
                         f'{list(CALIBRATION_METHODS)}, but got {method!r}')
    if target not in TARGETS:
        raise ValueError(f'target must be one of {TARGETS}, got {target!r}')
    if auto_fp32 < 0:
        raise ValueError(f'auto_fp32 must be >= 0, but got {auto_fp32}')
    if not calib_images:
        raise QuantizationError('no calibration image: cannot calibrate '
                                'the activation ranges')
    check_output_path(out, force)
    require_onnxruntime()
    names = compute_nodes(fp32_path)
    all_nodes = {n.name for n in _load(fp32_path).graph.node}
    unknown = [n for n in fp32_nodes if n not in all_nodes]
    if unknown:
        raise QuantizationError(
            f'--fp32-nodes {unknown} are not nodes of the FP32 graph; its '
            f'compute nodes are {names[:4]}{" ..." if len(names) > 4 else ""}'
            ' (all names: export without --int8 and open the graph)')
    input_name = create_session(fp32_path, ['CPUExecutionProvider']
                                ).get_inputs()[0].name
    reader = _reader([{input_name: a} for a in calib_images])
    info = dict(method=method, target=target, calib_images=len(calib_images),
                per_channel=True, format='QDQ',
                activation_type='int8' if target == 'gpu' else 'uint8',
                weight_type='int8', auto_fp32_nodes=[], sensitivity=None)
    with tempfile.TemporaryDirectory(prefix='cpd_mm_int8_') as tmp:
        src = _preprocess(fp32_path, tmp, logger)
        cache = None
        if _supports_cache():
            cache = osp.join(tmp, 'calibration.json')
            _calibrate(src, reader, method, target, percentile, cache, tmp)
        else:  # an older onnxruntime calibrates in every quantization
            print_log('int8: this onnxruntime has no calibration cache: '
                      'calibrating with its default settings, per '
                      'quantization', logger=logger, level=30)
        exclude = list(fp32_nodes)
        if auto_fp32:
            gains = _sensitivity(
                src, reader, method, target, exclude, cache, percentile,
                list(calib_images)[:sensitivity_images], tmp, logger)
            worst = sorted(gains, key=gains.get, reverse=True)[:auto_fp32]
            info.update(auto_fp32_nodes=worst, sensitivity=gains)
            exclude += worst
            print_log(f'int8: kept in FP32 by sensitivity: {worst}',
                      logger=logger)
        with atomic_output(out, force) as dst:
            _quantize(src, dst, reader, method, target, exclude, cache,
                      percentile)
            summary = quantization_summary(dst)
            if summary['quantized_compute_nodes'] == 0:
                raise QuantizationError(
                    f'onnxruntime quantized none of the {len(names)} compute '
                    f'nodes ({", ".join(COMPUTE_OPS)}) of {fp32_path} '
                    f'(kept in FP32 on request: {len(exclude)}); no INT8 file '
                    f'written to {out}. Export in FP32 instead, or keep fewer '
                    'nodes in FP32')
            left = [n for n in summary['fp32_compute_nodes']
                    if n not in exclude]
            if left:
                print_log(f'int8: onnxruntime left {len(left)} compute '
                          f'node(s) in FP32 (no quantized kernel or input): '
                          f'{left[:8]}', logger=logger, level=30)
            if before_publish is not None:
                before_publish(dst)
            size = os.path.getsize(dst)
    info.update(path=osp.abspath(out), fp32_nodes=exclude, size_bytes=size,
                **summary)
    return info
