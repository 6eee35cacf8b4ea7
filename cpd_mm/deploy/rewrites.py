"""Export-time stand-ins for modules that ONNX cannot express as they are.

Each stand-in computes exactly what the original module computes; it only
uses other ops. They are swapped in for the duration of an export and the
original modules are put back afterwards, so the user's model is unchanged.
"""
import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['StaticAdaptiveAvgPool2d', 'exportable_modules']


def _pool_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """``[out, size]`` averaging matrix of PyTorch's adaptive windows.

    Window ``i`` covers ``[floor(i * size / out), ceil((i + 1) * size / out))``
    (the rule of ATen's adaptive_avg_pool2d).
    """
    m = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i in range(out):
        start = (i * size) // out
        end = -((-(i + 1) * size) // out)  # ceil division
        m[i, start:end] = 1.0 / (end - start)
    return m


class StaticAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` that exports for any input size.

    ONNX has no adaptive pooling: the TorchScript exporter lowers it to
    AveragePool only when the output size divides the input size (PSPNet's
    pyramid bins 3 and 6 on an 8x8 feature map do not). With the input size
    fixed at export, the windows are fixed too, so the pooling is the linear
    map ``P_h @ x @ P_w.T``, two MatMuls against constant matrices. Where the
    sizes divide, the native op is kept (it is cheaper).
    """

    def __init__(self, pool: nn.AdaptiveAvgPool2d):
        super().__init__()
        self.output_size = pool.output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        size = self.output_size
        oh, ow = (size, size) if isinstance(size, int) else size
        oh, ow = oh or h, ow or w  # None keeps that dimension
        if h % oh == 0 and w % ow == 0:
            return F.adaptive_avg_pool2d(x, (oh, ow))
        return _pool_matrix(h, oh, x) @ x @ _pool_matrix(w, ow, x).t()


#: original type -> stand-in (exact types: subclasses may change forward).
_STAND_INS = {nn.AdaptiveAvgPool2d: StaticAdaptiveAvgPool2d}


@contextlib.contextmanager
def exportable_modules(model: nn.Module) -> Iterator[int]:
    """Swap in the stand-ins of :data:`_STAND_INS`; yield how many.

    The original modules are restored on exit, also after an exception.
    """
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            stand_in = _STAND_INS.get(type(child))
            if stand_in is not None:
                setattr(parent, name, stand_in(child))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
