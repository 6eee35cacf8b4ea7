"""Helpers shared by tools/train.py and tools/test.py.

User errors (wrong paths, misspelt ``--cfg-options`` keys, bad hook or model
arguments) become a :class:`CLIError` with a one-line message, which
:func:`run_cli` prints without a traceback (set ``CPD_MM_TRACEBACK=1`` to see
it). Anything else is a bug and keeps its traceback.
"""
import copy
import difflib
import inspect
import os
import os.path as osp
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

from .checkpoint import CheckpointLoadError, download_checkpoint

__all__ = [
    'CLIError', 'run_cli', 'load_config', 'merge_cfg_options',
    'check_cfg_options', 'check_file', 'check_checkpoint', 'check_data_paths',
    'check_hooks', 'check_launcher', 'runner_class', 'build_runner',
    'refuse_pruned_checkpoint', 'set_local_rank'
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


def _is_remote(path: str) -> bool:
    return '://' in path


def check_checkpoint(path: str, what: str = 'checkpoint',
                     download: bool = False) -> str:
    """Check a checkpoint path before the runner is built; return it.

    A local file must exist. A URL is not checked unless ``download`` is
    set: then it is downloaded into mmengine's cache now (a failed download
    is one line that says where to put the file), so that the runner finds
    it there.

    Raises:
        CLIError: a local file does not exist.
        CheckpointLoadError: the download failed.
    """
    if not _is_remote(path):
        return check_file(path, what)
    if download and path.startswith(('http://', 'https://')):
        download_checkpoint(path)
    return path


def check_hooks(cfg: Config) -> None:
    """Build the config's ``custom_hooks`` once, to fail on bad arguments.

    Hooks validate their arguments in ``__init__`` and are cheap to build,
    so a wrong one (``target_sparsity=1.5``) is reported before the missing
    files and before the runner logs its environment.

    Raises:
        CLIError: with the hook's message.
    """
    from mmengine.registry import HOOKS
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        if not isinstance(hook, dict):
            continue  # an instance (Python-style config): already built
        hook = copy.deepcopy(hook)
        hook.pop('priority', None)  # the runner's, not the hook's
        try:
            with HOOKS.switch_scope_and_registry(
                    cfg.get('default_scope')) as registry:
                registry.build(hook)
        except _CONFIG_ERRORS as e:
            if os.environ.get('CPD_MM_TRACEBACK') == '1':
                raise
            raise CLIError(f'cannot build the runner: custom_hooks.{i}: '
                           f'{type(e).__name__}: {e}') from e
        except Exception:  # noqa: B902
            continue  # needs what only the runner has (e.g. a visualizer)


def _missing_data_path(dataset: Any, where: str) -> Optional[str]:
    """First local path of a dataset config that does not exist, described.

    Follows dataset wrappers (``dataset``, ``datasets``). ``ann_file`` and
    ``data_prefix`` are joined to ``data_root`` as mmengine's BaseDataset
    does. Remote paths and non-local ``backend_args`` are not checked.
    """
    if not isinstance(dataset, dict):
        return None
    if isinstance(dataset.get('dataset'), dict):
        return _missing_data_path(dataset['dataset'], where + '.dataset')
    if isinstance(dataset.get('datasets'), (list, tuple)):
        for i, child in enumerate(dataset['datasets']):
            problem = _missing_data_path(child, f'{where}.datasets.{i}')
            if problem:
                return problem
        return None
    backend = dataset.get('backend_args') or {}
    if backend.get('backend', 'local') != 'local':
        return None
    root = dataset.get('data_root') or ''
    if not isinstance(root, str) or _is_remote(root):
        return None
    if root and not osp.isdir(root):
        return f'{where}.data_root "{root}" does not exist'
    prefix = dataset.get('data_prefix') or {}
    paths = [('ann_file', dataset.get('ann_file'))] + (
        [('data_prefix', prefix)] if isinstance(prefix, str) else
        [(f'data_prefix.{k}', v) for k, v in prefix.items()])
    for name, value in paths:
        if not value or not isinstance(value, str) or _is_remote(value):
            continue
        full = osp.join(root, value)  # an absolute value stays as is
        if not osp.exists(full):
            return f'{where}.{name} "{full}" does not exist'
    return None


def check_data_paths(cfg: Config, loaders: Iterable[str]) -> None:
    """Fail in one line if a dataloader's data is not where the config says.

    Checks ``data_root``, ``ann_file`` and ``data_prefix`` of the datasets of
    the dataloaders named in ``loaders`` (absent or None ones are skipped).

    Raises:
        CLIError: naming the config key and the missing path.
    """
    for name in loaders:
        loader = cfg.get(name)
        if isinstance(loader, dict):
            problem = _missing_data_path(loader.get('dataset'),
                                         f'{name}.dataset')
            if problem:
                hint = (' (generate the demo data with python '
                        'tools/make_demo_data.py)' if 'data/demo' in problem
                        else '')
                raise CLIError(problem + hint)


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


# Which registry builds a dict, by the nearest config key above it that
# names a kind of component (list indices and hook names are skipped).
_REGISTRY_BY_KEY = {
    'model': 'MODELS', 'model_wrapper_cfg': 'MODEL_WRAPPERS',
    'init_cfg': 'WEIGHT_INITIALIZERS', 'dataset': 'DATASETS',
    'datasets': 'DATASETS', 'pipeline': 'TRANSFORMS',
    'transforms': 'TRANSFORMS', 'sampler': 'DATA_SAMPLERS',
    'batch_sampler': 'DATA_SAMPLERS', 'custom_hooks': 'HOOKS',
    'default_hooks': 'HOOKS', 'optim_wrapper': 'OPTIM_WRAPPERS',
    'optimizer': 'OPTIMIZERS', 'param_scheduler': 'PARAM_SCHEDULERS',
    'train_cfg': 'LOOPS', 'val_cfg': 'LOOPS', 'test_cfg': 'LOOPS',
    'val_evaluator': 'METRICS', 'test_evaluator': 'METRICS',
    'visualizer': 'VISUALIZERS', 'vis_backends': 'VISBACKENDS',
    'log_processor': 'LOG_PROCESSORS',
}


def _registry_for(parts: List[str]):
    """mmengine root registry for the dict at ``parts``, or None."""
    import mmengine.registry as registries
    for part in reversed(parts):
        if part in _REGISTRY_BY_KEY:
            return getattr(registries, _REGISTRY_BY_KEY[part])
    return None


def _init_arguments(obj: Any) -> List[str]:
    """Keyword arguments that ``obj`` (a class or a function) accepts.

    For a class, ``__init__`` is read along the MRO for as long as each one
    takes ``**kwargs`` (which it is assumed to pass up to its base).
    """
    names: List[str] = []
    owners = [k for k in getattr(obj, '__mro__', ()) if '__init__' in
              vars(k) and k is not object] if inspect.isclass(obj) else [obj]
    for owner in owners:
        try:
            params = inspect.signature(
                vars(owner)['__init__'] if inspect.isclass(owner) else owner
            ).parameters.values()
        except (TypeError, ValueError):  # builtins without a signature
            break
        names += [p.name for p in params if p.kind in (
            p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != 'self']
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _built_class(cfg: Config, parts: List[str], node: dict) -> Any:
    """The class (or function) that builds ``node``, or None if unknown.

    ``node['type']`` is looked up in the registry of the component kind that
    ``parts`` addresses, in the config's ``default_scope`` (``scope.Type``
    names pick their own scope), as the runner will.
    """
    kind = node.get('type')
    if callable(kind):
        return kind
    registry = _registry_for(parts)
    if not isinstance(kind, str) or registry is None:
        return None
    try:
        with registry.switch_scope_and_registry(
                cfg.get('default_scope')) as scoped:
            return scoped.get(kind)
    except Exception:  # noqa: B902  (a broken scope is the runner's error)
        return None


def check_cfg_options(cfg: Config, options: Optional[Dict[str, Any]]) -> None:
    """Reject ``--cfg-options`` keys that do not address the config.

    For each dotted key, every parent (all components but the last) must
    exist in ``cfg`` (list items by index). The last component may add a new
    key:

    * if the addressed dict has a ``type`` whose class (looked up in
      mmengine's registries like the runner does) takes it as an argument:
      ``model.backbone.frozen_stages=1`` for a ResNet (close to
      ``num_stages``, but a ResNet argument);
    * otherwise, unless it is close (difflib) to an existing sibling or to
      an argument of that class, which is taken as a misspelling:
      ``train_cfg.max_eopchs=3`` fails and suggests ``max_epochs``, while
      ``train_dataloader.dataset.indices=8`` adds a key.

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
            if not isinstance(node, (dict, list, tuple)):
                raise CLIError(f'--cfg-options key "{key}": "{path}" is '
                               f'{node!r}, not a dict or list')
            if last and isinstance(node, dict):
                built = _built_class(cfg, parts[:depth], node)
                arguments = _init_arguments(built) if built else []
                if part in arguments:
                    break  # a new argument of the class the dict builds
                close = _suggest(part, dict.fromkeys(names + arguments))
                if not close:
                    break  # a genuinely new key
            else:
                close = _suggest(part, names)
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
    deep CUDA traceback; say so in one line instead. A process group that
    already exists (e.g. gloo, set up by a test harness) is fine: the
    runner then uses it and starts no launcher.
    """
    import torch.distributed as dist
    if launcher != 'none' and get_device() in ('cpu', 'mps') and not (
            dist.is_available() and dist.is_initialized()):
        raise CLIError(f'--launcher {launcher} needs GPUs (mmengine sets a '
                       'CUDA device per process); on this CPU-only machine '
                       'run without --launcher')


def runner_class(cfg: Config) -> type:
    """The runner class to build: ``CPDRunner`` unless ``runner_type`` says.

    A ``runner_type`` that derives from mmengine's ``Runner`` (and not yet
    from ``CPDRunner``) is combined with ``CPDRunner``, so that pruned
    checkpoints are applied before the model is wrapped; other runners
    (``FlexibleRunner``) are used as they are.
    """
    from cpd_mm.prune.loading import CPDRunner
    if 'runner_type' not in cfg:
        return CPDRunner
    with RUNNERS.switch_scope_and_registry(cfg.get('default_scope')) as reg:
        cls = reg.get(cfg.runner_type)
    if cls is None:
        raise CLIError(f'runner_type "{cfg.runner_type}" is not registered')
    if cls is Runner:
        return CPDRunner
    if issubclass(cls, Runner) and not issubclass(cls, CPDRunner):
        cls = type(f'CPD{cls.__name__}', (CPDRunner, cls), {})
    return cls


def build_runner(cfg: Config) -> Runner:
    """Build the runner of :func:`runner_class` from the config.

    Model, hooks and optimizer-independent parts are built here, so errors
    in their arguments (e.g. a sparsity out of range) surface now, and a
    pruned ``load_from`` checkpoint is applied (see ``CPDRunner``).

    Raises:
        CLIError: with the constructor's message, for config errors.
    """
    from cpd_mm.prune.plan import PlanMismatchError
    try:
        return runner_class(cfg).from_cfg(cfg)
    except PlanMismatchError as e:
        raise CLIError(str(e)) from e
    except _CONFIG_ERRORS as e:
        if os.environ.get('CPD_MM_TRACEBACK') == '1':
            raise
        raise CLIError(f'cannot build the runner: {type(e).__name__}: {e}'
                       ) from e


def refuse_pruned_checkpoint(runner: Any, path: str) -> None:
    """For runners that cannot apply a plan (not a ``Runner`` subclass, such
    as ``FlexibleRunner``): a pruned checkpoint is an error, not a load with
    mismatched shapes.

    Raises:
        CLIError: ``path`` holds a pruning plan.
    """
    from cpd_mm.prune.loading import checkpoint_plan
    checkpoint = _load_checkpoint(path, map_location='cpu')
    if isinstance(checkpoint, dict) and checkpoint_plan(checkpoint)[0]:
        raise CLIError(f'checkpoint "{path}" is pruned, but runner_type '
                       f'{type(runner).__name__} cannot apply its plan: '
                       'use a Runner subclass')
