"""Check that onnxruntime computes what PyTorch computes."""
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .benchmark import create_session
from .wrappers import export_module

__all__ = ['VerificationError', 'verify_onnx', 'DEFAULT_ATOL', 'DEFAULT_RTOL']

#: Float32 kernels of PyTorch and onnxruntime sum in different orders (and
#: the exporter folds BatchNorm into convolutions), so outputs differ by a few
#: ulps per layer; 1e-4 absolute + 1e-3 relative leaves room for deep models
#: while any real export bug (wrong op, missing layer, stale weights) is
#: orders of magnitude larger.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3


class VerificationError(AssertionError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


def verify_onnx(model: nn.Module,
                onnx_path: str,
                input_shape: Sequence[int],
                batch_sizes: Sequence[int] = (1, ),
                atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL,
                providers: Optional[Sequence[str]] = None,
                seed: int = 0) -> dict:
    """Compare ``onnx_path`` under onnxruntime with ``model``, random inputs.

    An element passes when ``|ort - torch| <= atol + rtol * |torch|`` (the
    rule of ``numpy.allclose``); every element of every output (all the maps
    of a detector) at every batch size must pass.

    Args:
        model: the PyTorch model that was exported.
        onnx_path: the exported graph.
        input_shape: ``(C, H, W)`` of one image.
        batch_sizes: batch sizes to try (more than one only for a graph with a
            dynamic batch axis).
        atol, rtol: tolerance, see above.
        providers: onnxruntime execution providers (default: see
            :func:`cpd_mm.deploy.benchmark.select_providers`).
        seed: seed of the standard-normal inputs (preprocessed images are
            roughly zero-mean, unit-variance).

    Returns:
        dict: ``passed`` (True), ``max_abs_diff``, ``max_rel_diff`` (relative
        to the largest ``|torch|`` output), ``max_abs_ref``,
        ``argmax_agreement`` (fraction of equal class predictions, per image
        or per pixel; for detectors, of the argmax over the channels of the
        first class map), ``atol``, ``rtol``, ``batch_sizes``,
        ``provider``, ``outputs`` (how many were compared).

    Raises:
        VerificationError: with the same numbers, when any element fails.
    """
    wrapper = export_module(model)
    device = next(model.parameters()).device
    session = create_session(onnx_path, providers)
    input_name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)

    max_abs, max_ref, worst_excess = 0.0, 0.0, -np.inf
    agree, total = 0, 0
    for batch in batch_sizes:
        x = torch.randn(batch, *input_shape, generator=generator)
        with torch.no_grad():
            refs = wrapper(x.to(device))
        refs = refs if isinstance(refs, tuple) else (refs, )
        outs = session.run(None, {input_name: x.numpy()})
        if len(outs) != len(refs):
            raise VerificationError(
                f'{onnx_path}: onnxruntime returns {len(outs)} outputs, '
                f'PyTorch {len(refs)}')
        for i, (out, ref) in enumerate(zip(outs, refs)):
            ref = ref.float().cpu().numpy()
            if out.shape != ref.shape:
                raise VerificationError(
                    f'{onnx_path}: onnxruntime output '
                    f'{session.get_outputs()[i].name} has shape {out.shape} '
                    f'!= PyTorch shape {ref.shape} (batch {batch})')
            diff = np.abs(out.astype(np.float64) - ref)
            max_abs = max(max_abs, float(diff.max()))
            max_ref = max(max_ref, float(np.abs(ref).max()))
            worst_excess = max(
                worst_excess, float((diff - atol - rtol * np.abs(ref)).max()))
            if i == 0:  # logits, or a detector's first class map
                same = out.argmax(axis=1) == ref.argmax(axis=1)
                agree, total = agree + int(same.sum()), total + same.size

    report = dict(
        passed=bool(worst_excess <= 0),
        max_abs_diff=max_abs,
        max_rel_diff=max_abs / max_ref if max_ref > 0 else 0.0,
        max_abs_ref=max_ref,
        argmax_agreement=agree / total,
        atol=atol,
        rtol=rtol,
        batch_sizes=list(batch_sizes),
        provider=session.get_providers()[0],
        outputs=len(refs))
    if not report['passed']:
        raise VerificationError(
            f'ONNX verification FAILED for {onnx_path}: max |onnxruntime - '
            f'torch| = {max_abs:.3g} exceeds atol={atol:g} + rtol={rtol:g} * '
            f'|torch| (largest |torch| output {max_ref:.3g}; argmax agreement '
            f'{report["argmax_agreement"]:.2%}; provider '
            f'{report["provider"]})')
    return report
