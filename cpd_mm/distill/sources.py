"""Where distillation tensors come from: named sources captured by hooks.

A *source* names a tensor produced while a model runs its ordinary forward:

* ``'logits'``: class scores of an MMPretrain classifier (the output of
  ``model.head``) or decode logits of an MMSegmentation segmentor (the
  output of ``decode_head.conv_seg``, at the decode head's resolution,
  usually 1/8 of the input; the last head of a cascade);
* ``'pre_logits'``: the embeddings the final classifier layer consumes,
  i.e. the input of ``decode_head.conv_seg`` taken *before*
  ``decode_head.dropout`` (so the student's are not dropped out), or the
  input of ``head.fc``;
* ``'<module.path>'``: the output of any submodule, e.g.
  ``'decode_head.bottleneck'``; ``'<module.path>:input'`` takes its first
  positional input instead.

Hooks are attached for one forward pass and removed afterwards, so modules
that the pruning surgery replaces are found again by name on the next step.
Hooks only fire when a module is *called*: MMSegmentation calls
``decode_head.forward(...)`` as a plain method, which is why ``'logits'``
hooks ``conv_seg`` and a module name should be a layer inside the head.
"""
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch.nn as nn
from torch import Tensor

LOGITS = 'logits'
PRE_LOGITS = 'pre_logits'


def head_path(model: nn.Module) -> str:
    """Path of the model's (last) decode head or classification head."""
    head = getattr(model, 'decode_head', None)
    if isinstance(head, nn.ModuleList):  # CascadeEncoderDecoder
        return f'decode_head.{len(head) - 1}'
    if isinstance(head, nn.Module):
        return 'decode_head'
    if isinstance(getattr(model, 'head', None), nn.Module):
        return 'head'
    raise ValueError(
        f"source '{LOGITS}': {type(model).__name__} has neither a "
        '`decode_head` (MMSegmentation) nor a `head` (MMPretrain); name the '
        'module to distil instead')


def logits_path(model: nn.Module) -> str:
    """Path of the module whose output is the model's logits."""
    path = head_path(model)
    if not path.startswith('decode_head'):
        return path
    if not isinstance(getattr(model.get_submodule(path), 'conv_seg', None),
                      nn.Module):
        raise ValueError(f"source '{LOGITS}': the decode head at '{path}' "
                         'has no `conv_seg` layer; name the layer that '
                         'outputs the logits instead')
    return path + '.conv_seg'


def codebase_of(model: nn.Module) -> str:
    """``'mmseg'`` for models with a decode head, else ``'mmpretrain'``."""
    return 'mmseg' if head_path(model).startswith('decode_head') \
        else 'mmpretrain'


def _classifier(model: nn.Module) -> Tuple[str, nn.Module]:
    path = head_path(model)
    head = model.get_submodule(path)
    for name in ('conv_seg', 'fc'):
        layer = getattr(head, name, None)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            return f'{path}.{name}', layer
    raise ValueError(
        f"source '{PRE_LOGITS}': the head {type(head).__name__} at "
        f"'{path}' has no `conv_seg` or `fc` layer; name the module whose "
        "output (or '<name>:input') holds the embeddings instead")


def resolve_source(model: nn.Module, source: str) -> Tuple[str, str]:
    """Return ``(module path, 'output' | 'input')`` for a source name.

    Raises:
        ValueError: if the model has no such module.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f'a source must be a non-empty str, got {source!r}')
    if source == LOGITS:
        return logits_path(model), 'output'
    if source == PRE_LOGITS:
        path, _ = _classifier(model)
        head = model.get_submodule(path.rpartition('.')[0])
        if path.endswith('conv_seg') and isinstance(
                getattr(head, 'dropout', None), nn.Module):
            return path.rpartition('.')[0] + '.dropout', 'input'
        return path, 'input'
    path, _, kind = source.partition(':')
    kind = kind or 'output'
    if kind not in ('output', 'input'):
        raise ValueError(f"source '{source}': the suffix must be ':input' "
                         f"or nothing, got ':{kind}'")
    try:
        model.get_submodule(path)
    except AttributeError:
        top = ', '.join(n for n, _ in model.named_children())
        raise ValueError(f"source '{source}': {type(model).__name__} has no "
                         f"submodule '{path}' (its children: {top})") from None
    return path, kind


def source_channels(model: nn.Module, source: str) -> Optional[int]:
    """Channel number of a source if the modules tell it, else None."""
    if source == PRE_LOGITS:
        _, layer = _classifier(model)
        return getattr(layer, 'in_channels', getattr(layer, 'in_features',
                                                     None))
    path, kind = resolve_source(model, source)
    module = model.get_submodule(path)
    attrs = ('in_channels', 'in_features') if kind == 'input' else (
        'out_channels', 'out_features', 'num_classes')
    for attr in attrs:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


@contextmanager
def record(model: nn.Module,
           sources: Iterable[str]) -> Iterator[Dict[str, object]]:
    """Capture the given sources during forward passes inside the block.

    Yields a dict ``source -> captured value`` filled as the hooked modules
    run; a module that runs several times keeps its last value.
    """
    store: Dict[str, object] = {}
    handles = []
    try:
        for source in dict.fromkeys(sources):
            path, kind = resolve_source(model, source)
            module = model.get_submodule(path)
            if kind == 'output':
                def hook(mod, args, out, source=source):
                    store[source] = out
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(mod, args, source=source):
                    store[source] = args[0] if args else None
                handles.append(module.register_forward_pre_hook(pre_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def fetch(store: Dict[str, object], model: nn.Module, source: str,
          role: str) -> Tensor:
    """Get a captured tensor, with an error naming the module otherwise."""
    path, kind = resolve_source(model, source)
    where = f"the {role}'s source '{source}' (the {kind} of '{path}')"
    if source not in store:
        raise RuntimeError(f'{where} was not produced: the module was not '
                           'called during the forward pass (a method call '
                           'like `head.forward(x)` does not run hooks)')
    value = store[source]
    if not isinstance(value, Tensor):
        raise ValueError(f'{where} is a {type(value).__name__}, not a '
                         'Tensor; pick a submodule that returns one tensor '
                         "(e.g. 'backbone.layer4' rather than 'backbone')")
    return value
