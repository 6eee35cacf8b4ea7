"""Layers whose latency channel pruning changes: find them and rebuild them.

A *spec* is a plain dict that fixes everything about a layer call except the
widths pruning changes (kind, kernel, stride, padding, dilation, groups
structure, input spatial size or tokens, batch, bias, full widths). Layers
with equal specs are measured once. Module kinds and their widths are below;
op handlers add the kinds of the constructs they own
(:attr:`cpd_mm.comb.handlers.OpHandler.latency`, e.g. ``attention``: fused
attention calls at ``(heads, qk_dim, v_dim)``).

==========  ==============================  ==================================
kind        module / call                   widths (in the table's API)
==========  ==============================  ==================================
conv        nn.Conv1d / nn.Conv2d           ``(cin, cout)``; grouped convs keep
                                            their group count, so both stay
                                            multiples of it
dwconv      depthwise conv (groups = cin)   ``c`` (one number; cout = c * mult)
linear      nn.Linear on ``[..., cin]``     ``(cin, cout)``; the token count is
                                            in the spec
==========  ==============================  ==================================
"""
import hashlib
import json
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..comb.handlers import op_handlers

__all__ = ['discover_layers', 'spec_id', 'spec_axes', 'sample_widths',
           'build_layer', 'interpolate', 'widths_of', 'output_size']

#: modules with channel-dependent latency that the table does not time
UNCOVERED = (nn.MultiheadAttention, nn.Conv3d, nn.ConvTranspose1d,
             nn.ConvTranspose2d, nn.ConvTranspose3d)
#: fractions of the full width sampled per axis, by number of samples
_FRACTIONS = {1: (1.0, ), 2: (0.25, 1.0), 3: (0.25, 0.5, 1.0),
              4: (0.25, 0.5, 0.75, 1.0), 5: (0.125, 0.25, 0.5, 0.75, 1.0),
              6: (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)}


def spec_id(spec: dict) -> str:
    """Stable short hash of a spec (equal specs are measured once)."""
    text = json.dumps(spec, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _conv_spec(m: nn.Module, x: torch.Tensor) -> dict:
    cin, cout, g = m.in_channels, m.out_channels, m.groups
    common = dict(dim=x.dim() - 2, kernel=list(m.kernel_size),
                  stride=list(m.stride), dilation=list(m.dilation),
                  padding=(m.padding if isinstance(m.padding, str)
                           else list(m.padding)),
                  padding_mode=m.padding_mode, bias=m.bias is not None,
                  input=[int(x.shape[0]), *map(int, x.shape[2:])])
    if g > 1 and g == cin:
        return dict(kind='dwconv', c=cin, mult=cout // cin, **common)
    return dict(kind='conv', cin=cin, cout=cout, groups=g, **common)


def _linear_spec(m: nn.Linear, x: torch.Tensor) -> dict:
    return dict(kind='linear', cin=m.in_features, cout=m.out_features,
                lead=list(map(int, x.shape[:-1])), bias=m.bias is not None)


def _op_kinds() -> dict:
    """Spec kind -> :class:`~cpd_mm.comb.handlers.LatencyKind` of the op
    handlers that are timed."""
    return {h.latency.kind: h.latency for h in op_handlers()
            if h.latency is not None}


def output_size(spec: dict, widths: Sequence[int]) -> int:
    """Elements of the layer's output at ``widths`` (for the share of
    width-proportional ops such as norms, activations and adds)."""
    kind = spec['kind']
    if kind in _op_kinds():
        return _op_kinds()[kind].output_size(spec, widths)
    if kind == 'linear':
        return int(np.prod(spec['lead'])) * widths[-1]
    cout = widths[0] * spec['mult'] if kind == 'dwconv' else widths[-1]
    return spec['input'][0] * cout * int(np.prod(spec['output']))


def widths_of(spec: dict) -> tuple:
    """The full widths of a spec, in the order of :func:`spec_axes`."""
    if spec['kind'] == 'dwconv':
        return (spec['c'], )
    if spec['kind'] in _op_kinds():
        return _op_kinds()[spec['kind']].widths_of(spec)
    return (spec['cin'], spec['cout'])


class _OpRecorder(TorchFunctionMode):
    """Records every call of an op kind's function with the innermost
    running module (the construct is a function, not a module)."""

    def __init__(self, stack: List[str], found: List[tuple]):
        super().__init__()
        self.stack, self.found = stack, found
        self.kinds = list(_op_kinds().values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = next((k for k in self.kinds if func is k.function), None)
        if kind is not None:
            owner = self.stack[-1] if self.stack else ''
            self.found.append((kind.kind, owner, kind.spec(args, kwargs)))
        return func(*args, **kwargs)


def discover_layers(model: nn.Module, run: Callable[[], torch.Tensor],
                    example: torch.Tensor) -> Dict[str, dict]:
    """Run ``run()`` once and record the layers of ``model`` it calls.

    Args:
        model: the module whose submodule names key the result.
        run: one forward pass (e.g. ``lambda: wrapper(example)``).
        example: its input tensor; a layer reading it directly keeps its
            input width (image channels are not pruned), and one whose
            output is the returned tensor keeps its output width.

    Returns:
        dict: ``layers`` (module name -> list of specs, one per call),
        one entry per op kind (``attention``: key -> spec; the key is the
        innermost module running the call, with ``#i`` for its i-th
        further call) and ``uncovered`` (modules of the kinds in
        :data:`UNCOVERED`, which the table does not time; attention
        computed with matmul and softmax instead of the fused function is
        not found either).
    """
    stack: List[str] = []
    calls: List[tuple] = []  # (name, spec, output tensor)
    found: List[tuple] = []
    handles = []

    def push(name):
        return lambda m, args: stack.append(name)

    def pop(m, args, out):
        stack.pop()

    def record(name):
        def hook(m, args, out):
            x = args[0]
            spec = (_linear_spec(m, x) if isinstance(m, nn.Linear)
                    else _conv_spec(m, x))
            spec['fixed_in'] = x is example
            if spec['kind'] != 'linear':
                spec['output'] = list(map(int, out.shape[2:]))
            calls.append((name, spec, out))
        return hook

    uncovered = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(push(name)))
        handles.append(m.register_forward_hook(pop))
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(record(name)))
        elif isinstance(m, UNCOVERED):
            uncovered.append(name)
    try:
        with torch.no_grad(), _OpRecorder(stack, found):
            result = run()
    finally:
        for h in handles:
            h.remove()
    layers: Dict[str, List[dict]] = {}
    for name, spec, out in calls:
        spec['fixed_out'] = out is result
        layers.setdefault(name, []).append(spec)
    result = dict(layers=layers)
    for kind in _op_kinds():
        result[kind] = {}
    for kind, owner, spec in found:
        calls, key, i = result[kind], owner, 0
        while key in calls:
            i += 1
            key = f'{owner}#{i}'
        calls[key] = spec
    result['uncovered'] = uncovered
    return result


def sample_widths(full: int, unit: int = 1, samples: int = 5,
                  block: int = 8) -> List[int]:
    """Widths to measure on one axis, ascending, ``full`` included.

    Fractions of ``full`` (1/8, 1/4, 1/2, 3/4, 1 for five samples) rounded
    to multiples of ``unit * block`` when the axis has at least two such
    steps (blocked kernels: onnxruntime's NCHWc convs need multiples of 8 on
    AVX2), else of ``unit`` (the conv group count of a grouped conv).
    """
    step = unit * block if full >= 2 * unit * block else unit
    fr = _FRACTIONS[max(1, min(samples, max(_FRACTIONS)))]
    widths = {full}
    for f in fr:
        widths.add(int(min(full, max(step, round(f * full / step) * step))))
    return sorted(widths)


def spec_axes(spec: dict, samples: int = 5, block: int = 8
              ) -> List[List[int]]:
    """Sampled widths per axis of a spec (the measurement grid).

    Conv / linear: ``samples`` per axis (an axis that reads the model input
    or makes its output has only its full width); depthwise conv: one axis;
    op kinds: as their :class:`~cpd_mm.comb.handlers.LatencyKind` says.
    """
    kind = spec['kind']
    if kind == 'dwconv':
        return [sample_widths(spec['c'], 1, samples, block)]
    if kind in _op_kinds():
        return _op_kinds()[kind].axes(spec, sample_widths, samples, block)
    unit = spec.get('groups', 1)
    cin = ([spec['cin']] if spec.get('fixed_in')
           else sample_widths(spec['cin'], unit, samples, block))
    cout = ([spec['cout']] if spec.get('fixed_out')
            else sample_widths(spec['cout'], unit, samples, block))
    return [cin, cout]


def build_layer(spec: dict, widths: Sequence[int]):
    """``(module, [inputs])`` that computes the spec's layer at ``widths``."""
    kind = spec['kind']
    if kind in ('conv', 'dwconv'):
        conv = (nn.Conv1d, nn.Conv2d)[spec['dim'] - 1]
        if kind == 'dwconv':
            cin = groups = widths[0]
            cout = cin * spec['mult']
        else:
            (cin, cout), groups = widths, spec['groups']
        m = conv(cin, cout, spec['kernel'], spec['stride'],
                 spec['padding'], spec['dilation'], groups, spec['bias'],
                 spec['padding_mode'])
        x = torch.randn(spec['input'][0], cin, *spec['input'][1:])
        return m, [x]
    if kind == 'linear':
        cin, cout = widths
        return (nn.Linear(cin, cout, spec['bias']),
                [torch.randn(*spec['lead'], cin)])
    if kind in _op_kinds():
        return _op_kinds()[kind].build(spec, widths)
    raise ValueError(f'unknown layer kind {kind!r}')


def interpolate(axes: Sequence[Sequence[int]], values: np.ndarray,
                point: Sequence[float]) -> float:
    """Multilinear interpolation on a grid (bilinear for two axes).

    Exact at the sampled widths; between two samples of an axis, linear in
    the width; outside the sampled range, the line through the two nearest
    samples is extended (clipped at 0). An axis with one sample is
    constant.
    """
    values = np.asarray(values, dtype=np.float64)
    corners = [((), 1.0)]
    for s, x in zip(axes, point):
        s = np.asarray(s, dtype=np.float64)
        if s.size == 1:
            parts = [(0, 1.0)]
        else:
            j = int(np.clip(np.searchsorted(s, x) - 1, 0, s.size - 2))
            t = (x - s[j]) / (s[j + 1] - s[j])
            parts = [(j, 1.0 - t), (j + 1, t)]
        corners = [(idx + (i, ), w * wi) for idx, w in corners
                   for i, wi in parts]
    return max(0.0, float(sum(w * values[idx] for idx, w in corners)))
