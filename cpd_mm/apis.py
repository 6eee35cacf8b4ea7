"""Entry points: build a (possibly pruned) model from config and checkpoint.

A pruned cpd_mm checkpoint is an ordinary mmengine checkpoint whose
``meta['cpd_plan']`` holds the pruning plan (plain data: per channel group,
the kept channel indices). Its ``state_dict`` already has the pruned
(smaller) shapes, so the model is rebuilt from the *original* config, shrunk
with the plan, and only then loaded::

    model = init_model('configs/demo/resnet18_demo-cls.py',
                       'work_dirs/demo/pruned.pth')
"""
import copy
import os.path as osp
from collections import OrderedDict
from typing import Optional, Union

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner.checkpoint import _load_checkpoint

from .prune.loading import checkpoint_plan
from .prune.plan import PlanMismatchError, apply_plan

__all__ = ['init_model', 'load_checkpoint_file', 'extract_state_dict',
           'CheckpointError']


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def _as_config(config: Union[str, Config], cfg_options: Optional[dict]):
    if isinstance(config, (str, bytes)) or hasattr(config, '__fspath__'):
        config = Config.fromfile(str(config))
    elif isinstance(config, Config):
        # merge_from_dict mutates: never touch the caller's Config
        config = copy.deepcopy(config)
    else:
        raise TypeError('`config` must be a file path or an mmengine Config, '
                        f'but got {type(config).__name__}')
    if cfg_options:
        config.merge_from_dict(cfg_options)
    return config


def load_checkpoint_file(filename: str, map_location='cpu') -> dict:
    """Read a checkpoint with mmengine's loader (local path, URL, ...).

    Raises:
        CheckpointError: naming the file, when it is missing or cannot be
            unpickled (truncated download, not a checkpoint, ...).
    """
    if '://' not in filename and not osp.isfile(osp.expanduser(filename)):
        raise CheckpointError(f'checkpoint file not found: {filename}')
    try:
        checkpoint = _load_checkpoint(filename, map_location=map_location)
    except Exception as exc:  # torch/pickle raise many unrelated types
        # cpd_mm.utils.checkpoint's loader already names the file
        msg = str(exc) if filename in str(exc) else (
            f'cannot read checkpoint {filename}: {type(exc).__name__}: {exc}')
        raise CheckpointError(msg) from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'checkpoint {filename} holds a {type(checkpoint).__name__}, '
            'expected a dict (a state dict, or {"state_dict": ..., '
            '"meta": ...})')
    return checkpoint


def extract_state_dict(checkpoint: dict) -> 'OrderedDict[str, torch.Tensor]':
    """The model weights of a checkpoint, unwrapped from wrappers.

    - ``checkpoint['state_dict']`` (mmengine) or ``checkpoint['model']`` if
      present, else the checkpoint itself is taken as the state dict;
    - a ``module.`` prefix (DataParallel) is stripped;
    - a checkpoint of the distillation wrapper (keys ``student.*``) keeps only
      the student: the prefix is stripped and ``teacher.*`` and any other
      wrapper-level keys (distillation loss heads) are dropped.
    """
    state_dict = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            state_dict = checkpoint[key]
            break
    state_dict = OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in state_dict.items())
    if any(k.startswith('student.') for k in state_dict):
        state_dict = OrderedDict((k[len('student.'):], v)
                                 for k, v in state_dict.items()
                                 if k.startswith('student.'))
    return state_dict


def init_model(config: Union[str, Config],
               checkpoint: Optional[str] = None,
               device: Optional[Union[str, torch.device]] = None,
               cfg_options: Optional[dict] = None) -> torch.nn.Module:
    """Build a model from a config and load a (possibly pruned) checkpoint.

    Args:
        config (str | Config): config file path or a loaded ``Config``; the
            caller's ``Config`` is not modified.
        checkpoint (str, optional): checkpoint to load. If its
            ``meta['cpd_plan']`` is set, the plan is applied to the freshly
            built model first (the model becomes physically smaller), then the
            weights are loaded. ``None`` keeps the constructor's random init.
        device (str | torch.device, optional): ``None`` picks ``'cuda'`` when
            available, else ``'cpu'``.
        cfg_options (dict, optional): overrides merged into the config
            (``Config.merge_from_dict`` semantics, dotted keys allowed).

    Returns:
        nn.Module: the model in eval mode on ``device``, with ``model.cfg``
        set to the (merged) config, ``model.cpd_plan`` to the plan or ``None``
        and ``model.dataset_meta`` from the checkpoint when it has one.

    Raises:
        CheckpointError: checkpoint missing / unreadable, plan that does not
            fit, or state-dict keys/shapes that do not match the model.
    """
    cfg = _as_config(config, cfg_options)
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    scope = cfg.get('default_scope')
    if scope is not None:
        init_default_scope(scope)
    model_cfg = copy.deepcopy(cfg.model)
    # as mmengine's Runner: a top-level data_preprocessor (mmpretrain
    # configs) is the model's unless the model sets its own
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor',
                             copy.deepcopy(cfg.data_preprocessor))
    # Weights come from `checkpoint`; never let a backbone try to download its
    # ImageNet initialisation (mmseg configs set `pretrained=...`).
    model_cfg.pop('pretrained', None)
    if 'train_cfg' in model_cfg:
        model_cfg['train_cfg'] = None  # training-only (batch augments, ...)
    model = MODELS.build(model_cfg)

    plan = None
    if checkpoint is not None:
        ckpt = load_checkpoint_file(checkpoint)
        meta = ckpt.get('meta') or {}
        plan, kind = checkpoint_plan(ckpt)
        state_dict = extract_state_dict(ckpt)
        if kind == 'gated':  # full-size weights, then their masks
            _load_state_dict_strict(model, state_dict, checkpoint)
        if plan is not None:
            try:
                model = apply_plan(model, plan)
            except PlanMismatchError as exc:  # other errors are bugs
                raise CheckpointError(
                    f'the pruning plan in {checkpoint} does not fit the model '
                    f'built from the config: {exc}') from exc
        if kind != 'gated':
            _load_state_dict_strict(model, state_dict, checkpoint)
        if isinstance(meta, dict) and meta.get('dataset_meta'):
            model.dataset_meta = meta['dataset_meta']
    model.cfg = cfg
    model.cpd_plan = plan
    return model.to(device).eval()


def _load_state_dict_strict(model, state_dict, filename):
    """``load_state_dict(strict=True)`` with a readable, bounded error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model '
                  f'{tuple(own[k].shape)}'
                  for k, v in state_dict.items()
                  if k in own and hasattr(v, 'shape')
                  and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:

        def head(items):
            more = f' (+{len(items) - 5} more)' if len(items) > 5 else ''
            return ', '.join(items[:5]) + more

        lines = [f'checkpoint {filename} does not match the model:']
        if mismatched:
            lines.append(f'  shape mismatch: {head(mismatched)}')
        if missing:
            lines.append(f'  missing keys: {head(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys: {head(unexpected)}')
        if mismatched:
            lines.append('  (a pruned checkpoint needs meta["cpd_plan"] and '
                         'the original, unpruned config)')
        raise CheckpointError('\n'.join(lines))
    model.load_state_dict(state_dict, strict=True)
