"""Load the student of a distillation checkpoint as a plain model.

A :class:`CPDDistiller` checkpoint stores the student under ``student.``,
the teacher under ``teacher.`` and the loss modules (CIRKD's projection head
and memories) under ``distill_losses.``. Two ways to get a plain student:

* in Python: ``model.load_state_dict(student_state_dict('iter_1000.pth'))``
  (plain checkpoints pass through unchanged, so tools can always call it);
* anywhere mmengine loads a checkpoint (``load_from``, ``tools/test.py``'s
  checkpoint argument, ``init_cfg=dict(type='Pretrained', ...)``): prefix
  the path with ``student://``, e.g. ``student://work_dirs/x/iter_1000.pth``.
  ``meta`` (e.g. a pruning plan) is kept.
"""
from collections import OrderedDict
from typing import Mapping, Union

from mmengine.runner import CheckpointLoader

STUDENT = 'student.'
#: top-level state-dict prefixes of a CPDDistiller
DISTILLER_PREFIXES = (STUDENT, 'teacher.', 'distill_losses.',
                      'data_preprocessor.')
SCHEME = 'student://'


def is_distill_state_dict(state_dict: Mapping) -> bool:
    """True if every key belongs to a CPDDistiller and one to its student."""
    keys = [k[len('module.'):] if k.startswith('module.') else k
            for k in state_dict]
    return (any(k.startswith(STUDENT) for k in keys)
            and all(k.startswith(DISTILLER_PREFIXES) for k in keys))


def student_state_dict(checkpoint: Union[str, Mapping]) -> OrderedDict:
    """Return the plain student state dict of a distillation checkpoint.

    Args:
        checkpoint (str | dict): a path or URI (loaded on CPU), a checkpoint
            dict with a ``'state_dict'`` entry, or a state dict.

    Returns:
        OrderedDict: the student's weights with the ``student.`` prefix (and
        a DDP ``module.`` prefix) removed, teacher and loss entries dropped.
        A state dict that is not a CPDDistiller's is returned as it is.
    """
    if isinstance(checkpoint, str):
        checkpoint = CheckpointLoader.load_checkpoint(
            checkpoint, map_location='cpu')
    state_dict = checkpoint.get('state_dict', checkpoint)
    if not is_distill_state_dict(state_dict):
        return state_dict
    out = OrderedDict()
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key.startswith(STUDENT):
            out[key[len(STUDENT):]] = value
    # keep per-module versions (BatchNorm uses them when loading)
    metadata = getattr(state_dict, '_metadata', None)
    if metadata is not None:
        out._metadata = OrderedDict(
            (k[len(STUDENT):], v) for k, v in metadata.items()
            if k.startswith(STUDENT))
        if 'student' in metadata:
            out._metadata[''] = metadata['student']
    return out


@CheckpointLoader.register_scheme(prefixes=SCHEME)
def load_from_student(filename: str, map_location=None) -> dict:
    """mmengine loader for ``student://<path>``: the student's weights."""
    checkpoint = CheckpointLoader.load_checkpoint(filename[len(SCHEME):],
                                                  map_location)
    if 'state_dict' in checkpoint:
        return dict(checkpoint, state_dict=student_state_dict(checkpoint))
    return student_state_dict(checkpoint)
