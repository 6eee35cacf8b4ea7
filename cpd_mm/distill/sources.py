"""Where distillation tensors come from: named sources captured by hooks.

A *source* names a tensor produced while a model runs its ordinary forward:

* ``'logits'``: class scores of an MMPretrain classifier (the output of
  ``model.head``) or decode logits of an MMSegmentation segmentor (the
  output of ``decode_head.conv_seg``, at the decode head's resolution,
  usually 1/8 of the input; the last head of a cascade); for a dense
  (single-stage) MMDetection detector, the classification maps of its
  ``bbox_head``, one ``(N, priors * classes, H, W)`` map per FPN level (the
  outputs of the head's classification conv: ``retina_cls``, ``conv_cls``,
  ``rtm_cls.<level>``, ``multi_level_conv_cls.<level>``, ...). Heads that
  also predict an objectness (YOLOX, RTMDet with ``with_objectness``) combine
  it with these maps outside the conv: their class branch is distilled;
* ``'pre_logits'``: the embeddings the final classifier layer consumes,
  i.e. the input of ``decode_head.conv_seg`` taken *before*
  ``decode_head.dropout`` (so the student's are not dropped out), or the
  input of ``head.fc``;
* ``'<module.path>'``: the output of any submodule, e.g.
  ``'decode_head.bottleneck'`` or a detector's ``'neck'`` (a tuple of FPN
  levels); ``'<module.path>:input'`` takes its first positional input
  instead.

A source whose module runs several times in one forward pass (a head conv
shared across FPN levels) yields the list of its outputs in call order;
a source made of several modules (per-level convs) yields their outputs in
module order. Losses get such multi-level sources as lists (see
:class:`~cpd_mm.distill.CPDDistiller`).

Hooks are attached for one forward pass and removed afterwards, so modules
that the pruning surgery replaces are found again by name on the next step.
Hooks only fire when a module is *called*: MMSegmentation calls
``decode_head.forward(...)`` as a plain method, which is why ``'logits'``
hooks ``conv_seg`` and a module name should be a layer inside the head.
"""
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch.nn as nn
from torch import Tensor

LOGITS = 'logits'
PRE_LOGITS = 'pre_logits'


_DETECTOR_HEADS = ('bbox_head', 'rpn_head', 'roi_head')


def is_detector(model: nn.Module) -> bool:
    """Whether ``model`` looks like an MMDetection detector (by its heads)."""
    return not isinstance(getattr(model, 'decode_head', None), nn.Module) \
        and any(isinstance(getattr(model, name, None), nn.Module)
                for name in _DETECTOR_HEADS)


def head_path(model: nn.Module) -> str:
    """Path of the model's (last) decode, classification or dense head."""
    head = getattr(model, 'decode_head', None)
    if isinstance(head, nn.ModuleList):  # CascadeEncoderDecoder
        return f'decode_head.{len(head) - 1}'
    if isinstance(head, nn.Module):
        return 'decode_head'
    if is_detector(model):
        if isinstance(getattr(model, 'roi_head', None), nn.Module) or \
                not isinstance(getattr(model, 'bbox_head', None), nn.Module):
            raise ValueError(
                f"source '{LOGITS}': {type(model).__name__} is a two-stage "
                'detector; its class scores come per RoI, not per anchor. '
                "Name the module to distil instead (e.g. 'neck')")
        return 'bbox_head'
    if isinstance(getattr(model, 'head', None), nn.Module):
        return 'head'
    raise ValueError(
        f"source '{LOGITS}': {type(model).__name__} has neither a "
        '`decode_head` (MMSegmentation), a `bbox_head` (MMDetection) nor a '
        '`head` (MMPretrain); name the module to distil instead')


def dense_cls_paths(model: nn.Module) -> List[str]:
    """Paths of a dense detection head's classification conv(s).

    The head's child whose name ends with ``cls`` and whose output has
    ``num_base_priors * cls_out_channels`` channels: one conv shared across
    levels (RetinaNet's ``retina_cls``, FCOS's ``conv_cls``) or a
    ``ModuleList`` with one conv per level (RTMDet's ``rtm_cls``, YOLOX's
    ``multi_level_conv_cls``), whose entries are returned in level order.
    """
    head = model.bbox_head
    width = getattr(head, 'num_base_priors', 1) * getattr(
        head, 'cls_out_channels', getattr(head, 'num_classes', -1))
    found = []
    for name, child in head.named_children():
        if not name.endswith('cls'):
            continue
        convs = list(child) if isinstance(child, nn.ModuleList) else [child]
        if convs and all(getattr(c, 'out_channels', None) == width
                         for c in convs):
            found.append([f'bbox_head.{name}'] if len(convs) == 1 and
                         child is convs[0] else
                         [f'bbox_head.{name}.{i}' for i in range(len(convs))])
    if len(found) != 1:
        raise ValueError(
            f"source '{LOGITS}': cannot tell the classification conv of "
            f'{type(head).__name__} (looked for one child named *cls with '
            f'{width} output channels, found {len(found)}); name it instead')
    return found[0]


def logits_paths(model: nn.Module) -> List[str]:
    """Paths of the module(s) whose outputs are the model's logits."""
    path = head_path(model)
    if path == 'bbox_head':
        return dense_cls_paths(model)
    if not path.startswith('decode_head'):
        return [path]
    if not isinstance(getattr(model.get_submodule(path), 'conv_seg', None),
                      nn.Module):
        raise ValueError(f"source '{LOGITS}': the decode head at '{path}' "
                         'has no `conv_seg` layer; name the layer that '
                         'outputs the logits instead')
    return [path + '.conv_seg']


def codebase_of(model: nn.Module) -> str:
    """``'mmseg'`` (decode head), ``'mmdet'`` (detector heads) or
    ``'mmpretrain'``."""
    if isinstance(getattr(model, 'decode_head', None), nn.Module):
        return 'mmseg'
    if is_detector(model):
        return 'mmdet'
    head_path(model)  # raises for a model of no known codebase
    return 'mmpretrain'


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


def resolve_source(model: nn.Module, source: str) -> List[Tuple[str, str]]:
    """Return ``[(module path, 'output' | 'input'), ...]`` for a source name.

    One entry, except for the logits of a detector with per-level convs.

    Raises:
        ValueError: if the model has no such module.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f'a source must be a non-empty str, got {source!r}')
    if source == LOGITS:
        return [(p, 'output') for p in logits_paths(model)]
    if source == PRE_LOGITS:
        path, _ = _classifier(model)
        head = model.get_submodule(path.rpartition('.')[0])
        if path.endswith('conv_seg') and isinstance(
                getattr(head, 'dropout', None), nn.Module):
            return [(path.rpartition('.')[0] + '.dropout', 'input')]
        return [(path, 'input')]
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
    return [(path, kind)]


def source_channels(model: nn.Module, source: str) -> Optional[int]:
    """Channel number of a source if the modules tell it, else None."""
    if source == PRE_LOGITS:
        _, layer = _classifier(model)
        return getattr(layer, 'in_channels', getattr(layer, 'in_features',
                                                     None))
    path, kind = resolve_source(model, source)[0]
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
           sources: Iterable[str]) -> Iterator[Dict[str, list]]:
    """Capture the given sources during forward passes inside the block.

    Yields a dict ``source -> list of captured values``, one per call of the
    source's module(s), in call order (see :func:`fetch`).
    """
    store: Dict[str, list] = {}
    handles = []
    try:
        for source in dict.fromkeys(sources):
            store[source] = []
            for path, kind in resolve_source(model, source):
                module = model.get_submodule(path)
                if kind == 'output':
                    def hook(mod, args, out, values=store[source]):
                        values.append(out)
                    handles.append(module.register_forward_hook(hook))
                else:
                    def pre_hook(mod, args, values=store[source]):
                        values.append(args[0] if args else None)
                    handles.append(module.register_forward_pre_hook(pre_hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _is_tensors(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, Tensor) for v in value)


def fetch(store: Dict[str, list], model: nn.Module, source: str,
          role: str) -> Union[Tensor, List[Tensor]]:
    """Get a captured source: a tensor, or a list of tensors (one per level)
    when its module ran several times or returned a tuple of tensors.

    Raises an error naming the module when nothing was captured or the value
    is not made of tensors.
    """
    paths = resolve_source(model, source)
    names = ', '.join(f"'{p}'" for p, _ in paths)
    where = (f"the {role}'s source '{source}' (the {paths[0][1]} of "
             f'{names})')
    values = store.get(source)
    if not values:
        raise RuntimeError(f'{where} was not produced: the module was not '
                           'called during the forward pass (a method call '
                           'like `head.forward(x)` does not run hooks)')
    value = values[0] if len(values) == 1 else list(values)
    if isinstance(value, Tensor) or _is_tensors(value):
        return value
    kind = type(value).__name__ if len(values) == 1 else \
        f'list of {", ".join(sorted({type(v).__name__ for v in values}))}'
    raise ValueError(f'{where} is a {kind}, not a Tensor or a sequence of '
                     'Tensors; pick a submodule that returns tensors '
                     "(e.g. 'backbone.layer4' rather than 'backbone')")
