"""cpd_mm: Comb, Prune, Distill for MMPretrain and MMSegmentation.

Importing the package registers its modules (pruning hook, distiller, losses,
SeaFormer) in mmengine's *root* registries, so configs of any OpenMMLab scope
find them by plain type name after::

    custom_imports = dict(imports=['cpd_mm'], allow_failed_imports=False)
"""
from .version import __version__
from .utils import checkpoint as _checkpoint  # noqa: F401  (safe torch.load)
from . import comb  # noqa: F401
from . import prune  # noqa: F401
from . import distill  # noqa: F401
from . import models  # noqa: F401

__all__ = ['__version__']
