"""Helpers shared by tools/train.py and tools/test.py.

User errors (wrong paths, misspelt ``--cfg-options`` keys, bad hook or model
arguments) become a :class:`CLIError` with a one-line message, which
:func:`run_cli` prints without a traceback (set ``CPD_MM_TRACEBACK=1`` to see
it). Anything else is a bug and keeps its traceback.
"""
import difflib
import os
import os.path as osp
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

from .checkpoint import CheckpointLoadError

__all__ = [
    'CLIError', 'run_cli', 'load_config', 'merge_cfg_options',
    'check_cfg_options', 'check_file', 'build_runner', 'prepare_checkpoint',
    'set_local_rank', 'check_launcher'
]

# Exceptions raised while building a runner that stem from the config:
# mmengine's registry re-raises a constructor's error with the class name
# prefixed ("class `X` in module: message"), so the message is enough.
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AssertionError,
                  FileNotFoundError, NotImplementedError)


class CLIError(Exception):
    """A user error; :func:`run_cli` prints ``error: <message>``."""


def run_cli(main: Callable[[], Any]) -> None:
    """Call ``main()``; print user errors in one line and exit with 1."""
    try:
        main()
    except (CLIError, CheckpointLoadError) as e:
        if os.environ.get('CPD_MM_TRACEBACK') == '1':
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


def check_file(path: str, what: str) -> str:
    """Return ``path`` if it is an existing file, else raise CLIError."""
    if not osp.isfile(path):
        hint = ' (it is a directory)' if osp.isdir(path) else ''
        raise CLIError(f'{what} "{path}" does not exist{hint}')
    return path


def load_config(path: str) -> Config:
    """Read a config file; a missing or unparsable file is a CLIError.

    For a missing file, close names in the same folder are suggested.
    """
    if not osp.isfile(path):
        folder = osp.dirname(path) or '.'
        names = os.listdir(folder) if osp.isdir(folder) else []
        close = _suggest(osp.basename(path), names)
        hint = ('; did you mean ' + ' or '.join(osp.join(folder, c)
                                               for c in close) + '?'
                if close else '')
        raise CLIError(f'config file "{path}" does not exist{hint}')
    try:
        return Config.fromfile(path)
    except (SyntaxError, ImportError, KeyError, ValueError, TypeError,
            FileNotFoundError) as e:
        # e.g. a syntax error, or a _base_ file that cannot be found.
        raise CLIError(f'cannot read config "{path}": '
                       f'{type(e).__name__}: {e}') from e


def _children(node: Any) -> List[str]:
    if isinstance(node, dict):
        return [str(k) for k in node.keys()]
    if isinstance(node, (list, tuple)):
        return [str(i) for i in range(len(node))]
    return []


def _suggest(name: str, candidates: Iterable[str]) -> List[str]:
    return difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)


def check_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> None:
    """Reject ``--cfg-options`` keys that do not address the config.

    For each dotted key, every parent (all components but the last) must
    exist in ``cfg`` (list items by index). The last component may add a new
    key, unless it is close to an existing sibling (difflib), which is taken
    as a misspelling: ``train_cfg.max_eopchs=3`` fails and suggests
    ``train_cfg.max_epochs``, while ``train_dataloader.dataset.indices=8``
    adds a key.

    Raises:
        CLIError: naming the key and suggesting close matches.
    """
    for key in options or {}:
        parts = key.split('.')
        node: Any = cfg._cfg_dict  # the plain dict behind Config
        for depth, part in enumerate(parts):
            path = '.'.join(parts[:depth])
            here = f'in "{path}"' if path else 'at the top level'
            names = _children(node)
            last = depth == len(parts) - 1
            if part in names:
                node = node[int(part) if isinstance(node, (list, tuple))
                            else part]
                continue
            close = _suggest(part, names)
            if last and not close and isinstance(node, dict):
                break  # a genuinely new key
            if not isinstance(node, (dict, list, tuple)):
                raise CLIError(f'--cfg-options key "{key}": "{path}" is '
                               f'{node!r}, not a dict or list')
            hint = (f'; did you mean {" or ".join(close)}?' if close else
                    f'; its keys are: {", ".join(names) or "(none)"}')
            raise CLIError(f'--cfg-options key "{key}": "{part}" does not '
                           f'exist {here}{hint}')


def merge_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> None:
    """:func:`check_cfg_options`, then merge ``options`` into ``cfg``."""
    if options:
        check_cfg_options(cfg, options)
        cfg.merge_from_dict(options)


def set_local_rank(local_rank: int) -> None:
    """torchrun sets LOCAL_RANK; older launchers pass ``--local-rank``."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(local_rank)


def check_launcher(launcher: str) -> None:
    """Fail early if a distributed launcher cannot start on this machine.

    mmengine 0.10's launchers call ``torch.cuda.set_device`` (unless an NPU,
    MLU or MUSA device is present), so on a CPU-only machine they end in a
    deep CUDA traceback; say so in one line instead.
    """
    if launcher != 'none' and get_device() in ('cpu', 'mps'):
        raise CLIError(f'--launcher {launcher} needs GPUs (mmengine sets a '
                       'CUDA device per process); on this CPU-only machine '
                       'run without --launcher')


def build_runner(cfg: Config) -> Runner:
    """Build the runner the config asks for (``runner_type``, else Runner).

    Model, hooks and optimizer-independent parts are built here, so errors
    in their arguments (e.g. a sparsity out of range) surface now.

    Raises:
        CLIError: with the constructor's message, for config errors.
    """
    try:
        if 'runner_type' in cfg:
            return RUNNERS.build(cfg)
        return Runner.from_cfg(cfg)
    except _CONFIG_ERRORS as e:
        if os.environ.get('CPD_MM_TRACEBACK') == '1':
            raise
        raise CLIError(f'cannot build the runner: {type(e).__name__}: {e}'
                       ) from e


def prepare_checkpoint(runner_or_cfg: Union[Runner, Config],
                       checkpoint_path: str, training: bool = False) -> dict:
    """Check a checkpoint before it is evaluated; return its content.

    Called by tools/test.py (and tools/train.py for ``load_from``) after the
    runner is built and before the runner loads the weights, so that the
    model can be adapted to the checkpoint first. It checks that the file
    exists and is loadable (with the safe globals of
    :mod:`cpd_mm.utils.checkpoint`) and, if it holds a pruning plan, prunes the runner's model to it and loads
    the weights (:func:`cpd_mm.prune.loading.load_into_runner`), so a pruned
    checkpoint works with the original, unpruned config.

    Raises:
        CLIError: the file does not exist.
        CheckpointLoadError: the file is truncated, corrupt or unsafe.
    """
    if '://' not in checkpoint_path:  # URLs are checked by their loader
        check_file(checkpoint_path, 'checkpoint')
    checkpoint = _load_checkpoint(checkpoint_path, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(
            checkpoint_path, f'expected a dict, got {type(checkpoint)}')
    if isinstance(runner_or_cfg, Runner):
        from cpd_mm.prune.loading import load_into_runner
        from cpd_mm.prune.plan import PlanMismatchError
        try:
            loaded = load_into_runner(runner_or_cfg, checkpoint_path,
                                      checkpoint, training=training)
        except PlanMismatchError as e:
            raise CLIError(f'checkpoint "{checkpoint_path}": {e}') from e
        from cpd_mm.distill import is_distill_state_dict
        from mmengine.model import is_model_wrapper
        model = runner_or_cfg.model
        model = model.module if is_model_wrapper(model) else model
        if not loaded and not hasattr(model, 'student') and \
                is_distill_state_dict(checkpoint.get('state_dict', {})):
            # a distillation run's checkpoint with the plain student config
            runner_or_cfg._load_from = 'student://' + checkpoint_path
    return checkpoint
