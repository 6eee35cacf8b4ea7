"""Export a (pruned) model as an INT8 ONNX graph calibrated on the config's
own data, and check it against the FP32 graph.

Example::

    from cpd_mm.apis import init_model
    from cpd_mm.deploy import export_int8
    model = init_model(cfg, 'work_dirs/demo/cpd/pruned_final.pth')
    info = export_int8(model, 'pruned_int8.onnx', (32, 32), calib=256,
                       verify=True)
"""
import os.path as osp
import tempfile
from typing import Optional, Sequence

import numpy as np
from mmengine.logging import print_log
from torch import nn

from .atomic import check_output_path
from .benchmark import create_session
from .data import DataConfigError, preprocessed_images
from .onnx_export import export_onnx
from .quantize import output_error, quantize_onnx
from .verify import VerificationError

__all__ = ['DEFAULT_CALIB', 'DEFAULT_MIN_AGREEMENT', 'calibration_images',
           'verify_int8', 'export_int8']

#: calibration images by default: enough for stable min/max and histograms
DEFAULT_CALIB = 256
#: INT8 and FP32 predictions must agree on this fraction of held-out images
#: (classifiers) or pixels (segmentors) for ``verify``.
DEFAULT_MIN_AGREEMENT = 0.95


def calibration_images(model: nn.Module, count: int, input_shape,
                       split: str = 'train', logger=None):
    """``count`` images of ``model.cfg``'s ``split`` set, read through the
    test pipeline and the model's data preprocessor, at ``input_shape``.

    A set smaller than ``count`` is used whole (logged).

    Raises:
        DataConfigError: the config has no loader for ``split``.
    """
    if getattr(model, 'cfg', None) is None:
        raise DataConfigError('the model has no .cfg: build it with '
                              'cpd_mm.apis.init_model to calibrate on the '
                              "config's data")
    return preprocessed_images(model.cfg, model.data_preprocessor, split,
                               count, input_shape, True, logger)


def verify_int8(fp32_path: str, int8_path: str,
                images: Sequence[np.ndarray],
                min_agreement: float = DEFAULT_MIN_AGREEMENT,
                providers: Optional[Sequence[str]] = None) -> dict:
    """Compare the INT8 graph with the FP32 graph on ``images``.

    Agreement is the fraction of equal argmax predictions over the first
    output's axis 1: per image for a classifier, per pixel for a segmentor
    (for a detector, of the first class map).

    Returns:
        dict: ``passed``, ``argmax_agreement``, ``min_agreement``,
        ``images``, ``max_abs_diff``, ``relative_error``
        (:func:`cpd_mm.deploy.quantize.output_error`), ``provider``.

    Raises:
        VerificationError: the agreement is below ``min_agreement``.
    """
    if not images:
        raise VerificationError('no image to verify the INT8 graph on')
    ref, q = (create_session(p, providers) for p in (fp32_path, int8_path))
    name = ref.get_inputs()[0].name
    agree = total = 0
    max_abs = 0.0
    refs, outs = [], []
    for x in images:
        r_out, q_out = ref.run(None, {name: x}), q.run(None, {name: x})
        same = r_out[0].argmax(axis=1) == q_out[0].argmax(axis=1)
        agree, total = agree + int(same.sum()), total + same.size
        max_abs = max(max_abs, max(float(np.abs(r - o).max())
                                   for r, o in zip(r_out, q_out)))
        refs.append(r_out)
        outs.append(q_out)
    report = dict(passed=agree / total >= min_agreement,
                  argmax_agreement=agree / total,
                  min_agreement=min_agreement, images=len(images),
                  max_abs_diff=max_abs,
                  relative_error=output_error(refs, outs),
                  provider=q.get_providers()[0])
    if not report['passed']:
        raise VerificationError(
            f'INT8 verification FAILED for {int8_path}: INT8 and FP32 '
            f'predictions agree on {agree / total:.2%} of '
            f'{"pixels" if same.ndim > 1 else "images"} ({len(images)} '
            f'held-out images), below the required {min_agreement:.2%}. '
            'Keep the most sensitive nodes in FP32 (--auto-fp32 K or '
            '--fp32-nodes), try another --calib-method, or use more '
            '--calib images')
    return report


def export_int8(model: nn.Module, out: str, input_shape: Sequence[int],
                calib: int = DEFAULT_CALIB, method: str = 'minmax',
                target: str = 'cpu', fp32_nodes: Sequence[str] = (),
                auto_fp32: int = 0, calib_split: str = 'train',
                calib_images: Optional[Sequence[np.ndarray]] = None,
                verify: bool = False,
                min_agreement: float = DEFAULT_MIN_AGREEMENT,
                verify_images: int = 64, verify_split: str = 'val',
                in_channels: int = 3, opset: Optional[int] = None,
                force: bool = False, providers=None, logger=None,
                before_quantize=None) -> dict:
    """Export ``model`` to FP32 ONNX (in a temporary file), quantize it
    (:func:`cpd_mm.deploy.quantize.quantize_onnx`), verify, publish.

    Args:
        model: from :func:`cpd_mm.apis.init_model` (``model.cfg`` gives the
            data), eval mode.
        out: the INT8 ``.onnx`` (never written unless quantized and, with
            ``verify``, verified).
        input_shape: ``(H, W)``.
        calib: calibration images drawn evenly from ``calib_split`` (the
            train set, through the test pipeline: no image the val set is
            scored on), unless ``calib_images`` are given.
        verify: compare INT8 with FP32 on ``verify_images`` images of
            ``verify_split`` (the calibration images when the config has no
            such loader, logged) with :func:`verify_int8`.
        before_quantize: called with the FP32 temporary path (e.g. to
            verify it against PyTorch first).
        method, target, fp32_nodes, auto_fp32: see ``quantize_onnx``.

    Returns:
        dict: ``onnx`` (the FP32 export's info, its path temporary),
        ``int8`` (``quantize_onnx``'s) and ``verify`` (or None).
    """
    check_output_path(out, force)
    if not 0 <= min_agreement <= 1:
        raise ValueError(f'min_agreement must be in [0, 1], got '
                         f'{min_agreement}')
    if calib_images is None:
        if calib < 1:
            raise ValueError(f'calib must be >= 1, but got {calib}')
        calib_images = calibration_images(model, calib, input_shape,
                                          calib_split, logger)
        print_log(f'int8: {len(calib_images)} calibration images from the '
                  f'{calib_split} set', logger=logger)
    held_out = None
    if verify:
        try:
            held_out = calibration_images(model, verify_images, input_shape,
                                          verify_split, logger)
        except DataConfigError as exc:
            print_log(f'int8: {exc}; verifying on the calibration images '
                      'instead', logger=logger, level=30)
            held_out = list(calib_images)[:verify_images]
    checked = {}
    with tempfile.TemporaryDirectory(prefix='cpd_mm_fp32_') as tmp:
        fp32 = osp.join(tmp, 'fp32.onnx')
        kwargs = {} if opset is None else dict(opset=opset)
        info = export_onnx(model, fp32, input_shape, 1, in_channels,
                           **kwargs)
        if before_quantize is not None:
            before_quantize(fp32)

        def check(path):
            checked.update(verify_int8(fp32, path, held_out, min_agreement,
                                       providers))

        int8 = quantize_onnx(fp32, out, calib_images, method, target,
                             fp32_nodes, auto_fp32, force=force,
                             before_publish=check if verify else None,
                             logger=logger)
    return dict(onnx=info, int8=int8, verify=checked or None)
