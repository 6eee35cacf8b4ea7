"""Layers whose latency channel pruning changes: find them and rebuild them.

A *spec* is a plain dict that fixes everything about a layer call except the
widths pruning changes (kind, kernel, stride, padding, dilation, groups
structure, input spatial size or tokens, batch, bias, full widths). Layers
with equal specs are measured once. Kinds and their widths:

==========  ==============================  ==================================
kind        module / call                   widths (in the table's API)
==========  ==============================  ==================================
conv        nn.Conv1d / nn.Conv2d           ``(cin, cout)``; grouped convs keep
                                            their group count, so both stay
                                            multiples of it
dwconv      depthwise conv (groups = cin)   ``c`` (one number; cout = c * mult)
linear      nn.Linear on ``[..., cin]``     ``(cin, cout)``; the token count is
                                            in the spec
attention   F.scaled_dot_product_attention  ``(heads, qk_dim, v_dim)``
==========  ==============================  ==================================
"""
import hashlib
import json
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


def _attention_spec(q, k, v) -> dict:
    heads = int(q.shape[-3]) if q.dim() >= 3 else 1
    batch = int(np.prod(q.shape[:-3])) if q.dim() > 3 else 1
    return dict(kind='attention', batch=batch, heads=heads,
                tokens_q=int(q.shape[-2]), tokens_kv=int(k.shape[-2]),
                qk=int(q.shape[-1]), v=int(v.shape[-1]))


def output_size(spec: dict, widths: Sequence[int]) -> int:
    """Elements of the layer's output at ``widths`` (for the share of
    width-proportional ops such as norms, activations and adds)."""
    kind = spec['kind']
    if kind == 'attention':
        h, _, dv = widths
        return spec['batch'] * spec['tokens_q'] * h * dv
    if kind == 'linear':
        return int(np.prod(spec['lead'])) * widths[-1]
    cout = widths[0] * spec['mult'] if kind == 'dwconv' else widths[-1]
    return spec['input'][0] * cout * int(np.prod(spec['output']))


def widths_of(spec: dict) -> tuple:
    """The full widths of a spec, in the order of :func:`spec_axes`."""
    if spec['kind'] == 'dwconv':
        return (spec['c'], )
    if spec['kind'] == 'attention':
        return (spec['heads'], spec['qk'], spec['v'])
    return (spec['cin'], spec['cout'])


class _SDPARecorder(TorchFunctionMode):
    """Records every scaled_dot_product_attention call with the innermost
    running module (attention is a function, not a module)."""

    def __init__(self, stack: List[str], found: List[tuple]):
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ('query', 'key', 'value')
            qkv = [kwargs.get(n, args[i] if len(args) > i else None)
                   for i, n in enumerate(names)]
            owner = self.stack[-1] if self.stack else ''
            self.found.append((owner, _attention_spec(*qkv)))
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
        ``attention`` (key -> spec; the key is the innermost module running
        the call, with ``#i`` for its i-th further call) and ``uncovered``
        (modules of the kinds in :data:`UNCOVERED`, which the table does
        not time; attention computed with matmul and softmax instead of
        ``F.scaled_dot_product_attention`` is not found either).
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
        with torch.no_grad(), _SDPARecorder(stack, found):
            result = run()
    finally:
        for h in handles:
            h.remove()
    layers: Dict[str, List[dict]] = {}
    for name, spec, out in calls:
        spec['fixed_out'] = out is result
        layers.setdefault(name, []).append(spec)
    attention: Dict[str, dict] = {}
    for owner, spec in found:
        key, i = owner, 0
        while key in attention:
            i += 1
            key = f'{owner}#{i}'
        attention[key] = spec
    return dict(layers=layers, attention=attention, uncovered=uncovered)


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
    attention: up to 3 head counts and 4 per-head widths for qk and v.
    """
    kind = spec['kind']
    if kind == 'dwconv':
        return [sample_widths(spec['c'], 1, samples, block)]
    if kind == 'attention':
        return [sample_widths(spec['heads'], 1, min(samples, 3), 10 ** 9),
                sample_widths(spec['qk'], 1, min(samples, 4), block),
                sample_widths(spec['v'], 1, min(samples, 4), block)]
    unit = spec.get('groups', 1)
    cin = ([spec['cin']] if spec.get('fixed_in')
           else sample_widths(spec['cin'], unit, samples, block))
    cout = ([spec['cout']] if spec.get('fixed_out')
            else sample_widths(spec['cout'], unit, samples, block))
    return [cin, cout]


class _AttentionCore(nn.Module):
    """Split of packed q/k/v, heads reshape, SDPA, merge: what sits between
    the qkv projection and the output projection of a ViT block."""

    def __init__(self, heads, qk, v, scale):
        super().__init__()
        self.heads, self.qk, self.v, self.scale = heads, qk, v, scale

    def forward(self, q_in, kv_in):
        h, dq, dv = self.heads, self.qk, self.v
        b, n, _ = q_in.shape
        m = kv_in.shape[1]
        k, v = kv_in.split([h * dq, h * dv], dim=-1)
        q = q_in.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, m, h, dq).transpose(1, 2)
        v = v.reshape(b, m, h, dv).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, h * dv)


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
    if kind == 'attention':
        h, dq, dv = widths
        b, n, m = spec['batch'], spec['tokens_q'], spec['tokens_kv']
        core = _AttentionCore(h, dq, dv, 1.0 / float(spec['qk']) ** 0.5)
        return core, [torch.randn(b, n, h * dq),
                      torch.randn(b, m, h * (dq + dv))]
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
