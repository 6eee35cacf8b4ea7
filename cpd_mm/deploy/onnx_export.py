"""Export an MMPretrain classifier, MMSegmentation segmentor or MMDetection
single-stage detector to ONNX."""
import os.path as osp
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .atomic import atomic_output, check_output_path
from .rewrites import exportable_modules
from .wrappers import export_module, model_task

__all__ = ['DEFAULT_OPSET', 'INPUT_NAME', 'OUTPUT_NAME', 'ExportError',
           'export_onnx', 'default_output_path', 'require_onnxsim']

#: LayerNormalization is a native op from opset 17 on (ViT backbones).
DEFAULT_OPSET = 17
INPUT_NAME = 'input'
OUTPUT_NAME = 'logits'


class ExportError(RuntimeError):
    """torch.onnx could not convert the model (an op without ONNX form)."""


def require_onnxsim():
    """Import onnxsim's ``simplify`` or raise a clear ``ImportError``."""
    try:
        from onnxsim import simplify
    except ImportError as exc:
        raise ImportError(
            '--simplify needs onnx-simplifier, which is not installed: '
            '`pip install onnxsim` (or export without --simplify)') from exc
    return simplify


def _simplify_in_place(path: str) -> None:
    import onnx
    simplify = require_onnxsim()
    simplified, ok = simplify(onnx.load(path))
    if not ok:
        raise RuntimeError(
            f'onnxsim could not validate the simplified graph of {path}')
    onnx.save(simplified, path)


def export_onnx(model: nn.Module,
                out: str,
                input_shape: Sequence[int],
                batch: int = 1,
                in_channels: int = 3,
                opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False,
                simplify: bool = False,
                force: bool = False,
                before_publish: Optional[Callable[[str], None]] = None
                ) -> dict:
    """Export ``model``'s logits or raw head maps
    (:mod:`cpd_mm.deploy.wrappers`) to ``out``.

    The graph is traced with the TorchScript-based exporter of
    ``torch.onnx.export`` (``dynamo=False``): tracing records the ops that one
    real forward pass runs, so the Python branching of OpenMMLab models needs
    no special care, and it needs no package beyond torch. Modules without an
    ONNX form are replaced by exact stand-ins while tracing
    (:mod:`cpd_mm.deploy.rewrites`). The file is checked
    with ``onnx.checker`` (and simplified with onnxsim if asked) before it is
    moved into place, see :func:`cpd_mm.deploy.atomic.atomic_output`.

    Args:
        model: classifier, segmentor or single-stage detector in eval mode
            (e.g. from
            :func:`cpd_mm.apis.init_model`, already pruned).
        out: output ``.onnx`` path.
        input_shape: ``(H, W)`` of the image.
        batch: batch size of the example input (the fixed batch size unless
            ``dynamic_batch``).
        in_channels: image channels.
        opset: ONNX opset version.
        dynamic_batch: make axis 0 of input and outputs symbolic
            (``'batch'``).
        simplify: run onnx-simplifier on the graph (needs ``onnxsim``).
        force: replace an existing ``out``.
        before_publish: called with the path of the finished temporary file
            before it is moved to ``out``; if it raises (e.g. a failed
            :func:`cpd_mm.deploy.verify.verify_onnx`), ``out`` is not written.

    Returns:
        dict: ``path``, ``task``, ``opset``, ``input_name``, ``output_name``,
        ``input_shape`` and ``output_shape`` (lists, batch as exported; of
        the first output), ``output_names`` and ``output_shapes`` (all
        outputs: one for classifiers and segmentors, one per kind and level
        for detectors), ``dynamic_batch``, ``simplified``, ``size_bytes``.

    Raises:
        FileExistsError: ``out`` exists and not ``force`` (before any work).
        ImportError: ``simplify`` without onnxsim, or onnx missing.
        ExportError: an op of the model has no ONNX form.
    """
    if len(input_shape) != 2 or min(input_shape) < 1 or batch < 1:
        raise ValueError(f'input_shape must be (H, W) > 0 and batch >= 1, '
                         f'but got {tuple(input_shape)} and {batch}')
    check_output_path(out, force)
    if simplify:
        require_onnxsim()
    import onnx

    task = model_task(model)
    wrapper = export_module(model)
    device = next(model.parameters()).device
    example = torch.randn(batch, in_channels, *input_shape, device=device)
    with torch.no_grad():
        outputs = wrapper(example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs, )
    output_names = list(wrapper.output_names)
    output_shapes = [list(o.shape) for o in outputs]
    dynamic_axes = ({name: {0: 'batch'} for name in [INPUT_NAME] +
                     output_names} if dynamic_batch else None)

    with atomic_output(out, force) as tmp:
        with warnings.catch_warnings(), exportable_modules(wrapper):
            # The TorchScript exporter is deprecated in favour of dynamo (which
            # needs onnxscript); tracer warnings about shape-dependent Python
            # branches are expected: only the batch axis may vary.
            warnings.simplefilter('ignore', DeprecationWarning)
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            try:
                torch.onnx.export(
                    wrapper, (example, ), tmp,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True)
            except torch.onnx.errors.OnnxExporterError as exc:
                # The message embeds the whole TorchScript graph: keep the
                # sentence that names the op.
                reason = str(exc).split(' [Caused by')[0].strip()
                raise ExportError(
                    f'cannot export {type(model).__name__} at input size '
                    f'{tuple(input_shape)} with opset {opset}: {reason}'
                ) from exc
        if simplify:
            _simplify_in_place(tmp)
        onnx.checker.check_model(tmp)
        size = osp.getsize(tmp)
        if before_publish is not None:
            before_publish(tmp)

    return dict(
        path=osp.abspath(out),
        task=task,
        opset=opset,
        input_name=INPUT_NAME,
        output_name=output_names[0],
        input_shape=[batch, in_channels, *map(int, input_shape)],
        output_shape=output_shapes[0],
        output_names=output_names,
        output_shapes=output_shapes,
        dynamic_batch=bool(dynamic_batch),
        simplified=bool(simplify),
        size_bytes=size)


def default_output_path(checkpoint: Optional[str]) -> str:
    """``<checkpoint without extension>.onnx`` (``model.onnx`` if none)."""
    if not checkpoint:
        return 'model.onnx'
    return osp.splitext(checkpoint)[0] + '.onnx'
