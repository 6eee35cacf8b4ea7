"""Secure loading of runner-written checkpoints under ``weights_only=True``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``: it only
rebuilds tensors, containers and explicitly allow-listed globals. mmengine
0.10.7 calls ``torch.load`` without ``weights_only``, and the checkpoints its
``Runner`` writes hold more than tensors:

* ``message_hub``: :class:`mmengine.logging.HistoryBuffer` objects (numpy
  arrays of logged values), whose ``__getstate__`` pickles the default
  statistics methods as ``getattr(HistoryBuffer, 'min')`` etc.;
* numpy scalars, dtypes and arrays from metrics and ``dataset_meta``.

Importing this module (``import cpd_mm`` does) makes such files load again
without switching ``weights_only`` off:

1. :data:`SAFE_GLOBALS` (found by writing checkpoints with real MMPretrain and
   MMSegmentation runners and listing what ``torch.load`` refused) is
   registered with ``torch.serialization.add_safe_globals``;
2. ``builtins.getattr`` is *not* allowed as such (it would reach any attribute
   of any allowed object); a replacement :func:`_history_buffer_getattr` is
   registered under that name that only resolves the four default statistic
   methods of ``HistoryBuffer`` and refuses everything else;
3. mmengine's loader for local paths is replaced by :func:`load_from_local`,
   which turns a missing, truncated, corrupt or unsafe file into a
   :class:`CheckpointLoadError` that names the file;
4. mmengine's loader for ``http(s)://`` (model-zoo URLs) is replaced by
   :func:`load_from_http`: same cache (torch.hub's ``checkpoints`` folder)
   and rank-0-first download, but a failed download is one
   :class:`CheckpointLoadError` that says which file to put where, on every
   rank (mmengine's would leave the other ranks waiting at a barrier).

:func:`save_checkpoint_atomic` writes a file that is complete or absent.

Whether ``weights_only`` is on stays torch's decision (its default, or the
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable for a trusted file).
This module must not import mmpretrain or mmseg: it runs at package import.
"""
import os
import os.path as osp
import pickle
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from mmengine.dist import broadcast_object_list, get_dist_info
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, save_checkpoint

try:  # numpy >= 2: the C core lives in numpy._core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

__all__ = [
    'CheckpointLoadError', 'SAFE_GLOBALS', 'load_from_local',
    'load_from_http', 'download_checkpoint', 'url_cache_path',
    'register_safe_globals', 'save_checkpoint_atomic'
]

# Names under which ``HistoryBuffer.__getstate__`` pickles its default
# statistics methods (see HistoryBuffer._set_default_statistics).
_HISTORY_BUFFER_METHODS = frozenset(('min', 'max', 'current', 'mean'))


class CheckpointLoadError(RuntimeError):
    """A checkpoint file is missing, unreadable or not safe to unpickle.

    The message always names the file; ``filename`` holds it too.
    """

    def __init__(self, filename: str, reason: str):
        self.filename = filename
        self.reason = reason
        super().__init__(f'cannot load checkpoint "{filename}": {reason}')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """Restricted stand-in for ``builtins.getattr`` during unpickling.

    Only ``getattr(HistoryBuffer, <default statistics method>)`` is resolved;
    any other call is refused, so allow-listing this function does not open
    the attribute access that a real ``getattr`` would.
    """
    if obj is HistoryBuffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refused getattr({obj!r}, {name!r}) while loading with '
        'weights_only=True: only the default HistoryBuffer statistics '
        'methods may be resolved')


def _numpy_dtype_classes():
    """The numpy dtype classes of values that runner checkpoints hold.

    Unpickling a numpy scalar or array rebuilds its ``np.dtype`` and then
    calls ``__setstate__`` on it, which torch only allows for allow-listed
    types, i.e. the concrete class such as ``numpy.dtypes.Float64DType``.
    Checkpoints of the demo classifier (MMPretrain), the segmenters
    (MMSegmentation) and a bare mmengine runner hold exactly these three:
    float64 and int64 (log buffers, metrics, counters) and float32 (metrics
    such as mIoU).
    """
    return [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]


# Each entry is an object or ``(object, 'module.qualname')`` when the name
# in the file differs from the object's own (numpy 1.x wrote numpy.core.*).
SAFE_GLOBALS = [
    HistoryBuffer,
    np.ndarray,
    np.dtype,
    (_np_multiarray._reconstruct, 'numpy._core.multiarray._reconstruct'),
    (_np_multiarray.scalar, 'numpy._core.multiarray.scalar'),
    (_np_multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
    (_np_multiarray.scalar, 'numpy.core.multiarray.scalar'),
    (_history_buffer_getattr, 'builtins.getattr'),
] + _numpy_dtype_classes()


def register_safe_globals() -> None:
    """Allow-list :data:`SAFE_GLOBALS` for ``weights_only`` loads.

    Idempotent (torch keeps a set). A no-op on torch < 2.4, which has no
    allow-list and loads with ``weights_only=False`` by default anyway.
    """
    add = getattr(torch.serialization, 'add_safe_globals', None)
    if add is not None:
        add(SAFE_GLOBALS)


# Phrases of torch's weights-only unpickler (and of _history_buffer_getattr)
# when it refuses a global; other unpickling errors mean a damaged file.
_REFUSAL_MARKERS = ('Unsupported global', 'Can only build', 'Can only create',
                    'Trying to call reduce', 'refused getattr', 'is blocked')


def _unpickler_detail(message: str) -> str:
    """The informative part of torch's long weights-only error message."""
    _, sep, detail = message.partition('WeightsUnpickler error:')
    if not sep:
        return message.strip()
    detail = detail.split('Check the documentation of torch.load')[0]
    detail = detail.split(' Please use')[0]  # drop torch's how-to
    return ' '.join(detail.split())


def load_from_local(filename: str,
                          map_location: Optional[Union[str, Callable]] = None
                          ) -> Dict:
    """Load a local checkpoint with ``torch.load``; errors name the file.

    Drop-in for mmengine's ``load_from_local`` (same name, arguments and
    result; mmengine logs the loader's name).

    Raises:
        CheckpointLoadError: the file does not exist, is truncated or
            corrupt, or holds a global that is not allow-listed. It subclasses
            ``RuntimeError``; the original error is kept as its cause.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise CheckpointLoadError(filename, 'no such file')
    try:
        return torch.load(filename, map_location=map_location)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if not any(m in detail for m in _REFUSAL_MARKERS):
            raise CheckpointLoadError(
                filename, f'the file is corrupt ({detail})') from e
        raise CheckpointLoadError(
            filename, f'it is not loadable with weights_only=True ({detail})'
            '. If you trust this file, allow-list the type with '
            'torch.serialization.add_safe_globals') from e
    except Exception as e:  # noqa: B902
        # A damaged file surfaces as RuntimeError ("PytorchStreamReader
        # failed ..."), OSError, EOFError, KeyError (legacy format) ...,
        # none of which says which file was being read.
        raise CheckpointLoadError(
            filename, 'the file is corrupt or truncated '
            f'({type(e).__name__}: {e})') from e


def save_checkpoint_atomic(checkpoint: dict, filename: str) -> None:
    """mmengine's ``save_checkpoint`` to a temporary name in the same
    folder, then a rename: a crash mid-write leaves no file (and no
    truncated one) under ``filename``, and a reader never sees half of
    it. Local paths only."""
    tmp = f'{filename}.{os.getpid()}.tmp'
    try:
        save_checkpoint(checkpoint, tmp)
        os.replace(tmp, filename)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)


def url_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where mmengine (through torch.hub) caches the file of ``url``.

    ``<torch.hub.get_dir()>/checkpoints/<file name of the URL>``; set
    ``TORCH_HOME`` to move it.
    """
    from urllib.parse import urlparse
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    return osp.join(model_dir, osp.basename(urlparse(url).path))


def download_checkpoint(url: str, model_dir: Optional[str] = None,
                        progress: bool = True) -> str:
    """Download ``url`` into mmengine's cache unless it is there; its path.

    Raises:
        CheckpointLoadError: the download failed; the message says where to
            put the file (or to set ``load_from`` to a local copy).
    """
    path = url_cache_path(url, model_dir)
    if osp.isfile(path):
        return path
    try:
        os.makedirs(osp.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, progress=progress)
    except Exception as e:  # noqa: B902  (URLError, HTTPError, timeouts...)
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())
        raise CheckpointLoadError(
            url, f'the download failed ({reason}). Download the file on a '
            f'machine with internet access and put it at {path} (mmengine '
            'loads it from there), or set load_from (or the checkpoint '
            'argument) to a local copy') from e
    return path


def load_from_http(filename: str, map_location=None,
                   model_dir: Optional[str] = None,
                   progress: bool = os.isatty(0)) -> Dict:
    """Drop-in for mmengine's ``load_from_http`` with one-line failures.

    Rank 0 downloads into the cache first, then the other ranks read it
    (downloading themselves on other machines). A failed download raises
    the same :class:`CheckpointLoadError` on every rank; a cached file that
    does not load names the file to delete.
    """
    from mmengine.utils.dl_utils import load_url
    rank, world_size = get_dist_info()
    reason = None
    if rank == 0:
        try:
            download_checkpoint(filename, model_dir, progress)
        except CheckpointLoadError as e:
            reason = e.reason
    if world_size > 1:  # also the barrier that mmengine's loader has
        box = [reason]
        broadcast_object_list(box, src=0)
        reason = box[0]
        if reason is None and rank > 0:
            download_checkpoint(filename, model_dir, progress)
    if reason is not None:
        raise CheckpointLoadError(filename, reason)
    try:
        return load_url(filename, model_dir=model_dir,
                        map_location=map_location, progress=progress)
    except Exception as e:  # noqa: B902
        path = url_cache_path(filename, model_dir)
        reason = ' '.join(f'{type(e).__name__}: {e}'.split())
        raise CheckpointLoadError(
            filename, f'the cached file {path} does not load ({reason}); '
            'delete it to download it again') from e


register_safe_globals()
# Replace mmengine's loader for plain paths ('' is the fallback prefix), so
# Runner.load_checkpoint, resume and load_from all report the file name.
CheckpointLoader.register_scheme(
    prefixes='', loader=load_from_local, force=True)
CheckpointLoader.register_scheme(
    prefixes=('http://', 'https://'), loader=load_from_http, force=True)
