"""Reading official SeaFormer checkpoints (fudan-zvg/SeaFormer).

Official files come in two layouts, and both use this package's key names:

* ImageNet (timm training script): unprefixed backbone keys under
  ``state_dict`` and ``state_dict_ema``, plus the classifier ``linear.*``,
  and training state (``args``: an ``argparse.Namespace``, ``optimizer``...).
* ADE20K (mmseg 0.x): ``state_dict`` with ``backbone.`` and ``decode_head.``
  prefixes.

The helpers pick the state dict, strip wrapper prefixes, split backbone from
head, and check a state dict against a model so that a corrupt file or one of
another variant fails with a message that says what is wrong.
"""
import argparse

import torch
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'read_checkpoint', 'select_state_dict', 'split_state_dict',
    'check_state_dict', 'load_backbone_state_dict'
]

# Wrapper prefixes some training scripts leave on every key (DDP, EMA).
_WRAPPER_PREFIXES = ('module.', 'ema_model.')


def read_checkpoint(filename):
    """Load a checkpoint file on CPU and return it as a dict.

    timm checkpoints pickle their ``argparse.Namespace`` of arguments, which
    ``torch.load(weights_only=True)`` refuses; it is allow-listed for this
    call only (a Namespace only carries plain attribute values).

    Raises:
        RuntimeError: the file is missing, corrupt or not a dict.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ckpt = CheckpointLoader.load_checkpoint(filename,
                                                    map_location='cpu')
        except RuntimeError:
            raise  # cpd_mm's loader already names the file and the cause
        except Exception as e:  # noqa: B902
            raise RuntimeError(f'cannot load checkpoint "{filename}": '
                               f'{type(e).__name__}: {e}') from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f'checkpoint "{filename}" holds a '
                           f'{type(ckpt).__name__}, not a dict')
    return ckpt


def select_state_dict(ckpt, ema='auto'):
    """Return ``(state_dict, source)`` from a loaded checkpoint dict.

    Args:
        ckpt (dict): The loaded file.
        ema (bool | str): True: ``state_dict_ema`` (error if absent);
            'auto': ``state_dict_ema`` if present (the official segmentation
            code's choice), else as False; False: ``state_dict``, else
            ``model``, else the dict itself if it only holds tensors.

    Wrapper prefixes (``module.``) are removed from every key.
    """
    if ema is True and 'state_dict_ema' not in ckpt:
        raise KeyError('the checkpoint has no "state_dict_ema" (it holds '
                       f'{sorted(ckpt)[:8]})')
    if ema and 'state_dict_ema' in ckpt:
        source = 'state_dict_ema'
    else:
        source = next((k for k in ('state_dict', 'model') if k in ckpt),
                      None)
    if source is not None:
        state_dict = ckpt[source]
    elif ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        state_dict, source = ckpt, '<top level>'
    else:
        raise KeyError('no state dict found: expected "state_dict", '
                       '"state_dict_ema" or "model", got keys '
                       f'{sorted(ckpt)[:8]}')
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out, source


def split_state_dict(state_dict):
    """Split into ``(backbone, head, kind)``; backbone keys unprefixed.

    ``kind`` is 'segmentation' when keys carry ``backbone.`` (head: the
    ``decode_head.`` keys, still prefixed), else 'imagenet' (head: the
    classifier ``linear.*`` keys). Any other key raises ``KeyError``.
    """
    if any(k.startswith('backbone.') for k in state_dict):
        backbone = {k[len('backbone.'):]: v for k, v in state_dict.items()
                    if k.startswith('backbone.')}
        head = {k: v for k, v in state_dict.items()
                if k.startswith('decode_head.')}
        kind = 'segmentation'
    else:
        backbone = {k: v for k, v in state_dict.items()
                    if not k.startswith('linear.')}
        head = {k: v for k, v in state_dict.items()
                if k.startswith('linear.')}
        kind = 'imagenet'
    other = sorted(set(state_dict) - set(head) -
                   {('backbone.' + k if kind == 'segmentation' else k)
                    for k in backbone})
    if other:
        raise KeyError(f'unexpected keys in a SeaFormer {kind} checkpoint: '
                       f'{other[:5]}' + (' ...' if len(other) > 5 else ''))
    return backbone, head, kind


def check_state_dict(model, state_dict, what='checkpoint'):
    """Raise ``ValueError`` unless ``state_dict`` fits ``model`` strictly.

    BatchNorm ``num_batches_tracked`` counters the file lacks are taken from
    the model (they only matter with ``momentum=None``). Returns the
    completed state dict.
    """
    expected = model.state_dict()
    state_dict = dict(state_dict)
    for key, value in expected.items():
        if key.endswith('num_batches_tracked') and key not in state_dict:
            state_dict[key] = value
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f'{k}: {tuple(state_dict[k].shape)} in file, '
        f'{tuple(expected[k].shape)} in model' for k in sorted(expected)
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for name, keys in (('missing keys', missing),
                       ('unexpected keys', unexpected),
                       ('shape mismatches', mismatched)):
        if keys:
            more = f' ... ({len(keys)} in all)' if len(keys) > 5 else ''
            problems.append(f'{name}: {keys[:5]}{more}')
    if problems:
        raise ValueError(
            f'{what} does not match {type(model).__name__} (wrong variant '
            'or not a SeaFormer checkpoint?); ' + '; '.join(problems))
    return state_dict


def load_backbone_state_dict(filename, backbone, use_ema=True):
    """Backbone weights from an official (or converted) checkpoint, checked
    strictly against ``backbone``.

    Args:
        filename (str): ImageNet or ADE20K checkpoint, official layout or
            written by ``tools/convert_seaformer.py``.
        backbone (nn.Module): The ``SeaFormer`` to load into.
        use_ema (bool): Prefer ``state_dict_ema`` if the file has it.
    """
    ckpt = read_checkpoint(filename)
    state_dict, source = select_state_dict(ckpt, 'auto' if use_ema else False)
    weights, _, kind = split_state_dict(state_dict)
    return check_state_dict(
        backbone, weights,
        what=f'"{filename}" ({kind} checkpoint, {source})')
