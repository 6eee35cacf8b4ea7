"""RoI feature extractors (RoIAlign, RoIPool of mmcv and torchvision): every
RoI gets the channels of the feature map it is cut from (axis 1), and a
removed (zero) channel gives zero features."""
import numpy as np

from ..space import TensorInfo, along, channel_axis
from .base import ModuleHandler, first_tensor, register_handler


def _roi_types():
    types = []
    try:
        from mmcv.ops import RoIAlign, RoIPool
        types += [RoIAlign, RoIPool]
    except ImportError:  # mmcv without compiled ops
        pass
    try:
        from torchvision.ops import RoIAlign as TVRoIAlign
        from torchvision.ops import RoIPool as TVRoIPool
        types += [TVRoIAlign, TVRoIPool]
    except ImportError:
        pass
    return tuple(types)


@register_handler
class RoIHandler(ModuleHandler):
    module_types = _roi_types()

    def trace(self, tr, name, m, args, kwargs, out):
        x = first_tensor(args, kwargs)
        info = tr.info(x)
        ch = channel_axis(tr.uf.find(info.ids))
        if ch is None:
            return TensorInfo(np.full((1, ) * out.dim(), -1), True)
        if ch != 1:
            tr.freeze(info.ids, f'{name}: RoI features with channels off '
                      'axis 1')
            return TensorInfo(np.full((1, ) * out.dim(), -1), True)
        shape = [1] * out.dim()
        shape[1] = x.shape[1]
        return TensorInfo(along(info.ids, 1, x.shape[1]).reshape(shape),
                          info.z)
