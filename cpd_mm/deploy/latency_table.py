"""A per-layer latency table measured on the deployment runtime.

Example::

    from cpd_mm.deploy import LatencyTable
    table = LatencyTable.build(model, (1, 3, 224, 224))  # measured or cached
    table.full_ms                                # the whole model, measured
    table.layer('backbone.layer1.0.conv2', 32, 48)          # ms
    table.predict({'backbone.layer1.0.conv2': (32, 48)})    # ms, model
    table.predict_model(pruned_model)                       # ms, model

What is measured. Every conv, linear and scaled-dot-product attention call
of one forward pass (:mod:`cpd_mm.deploy.layer_specs`) is rebuilt as a small
torch module, exported to ONNX and timed by onnxruntime on a grid of widths
(:mod:`cpd_mm.deploy.layer_timing`): 5 per axis by default, multiples of
the CPU's channel block where the width allows, the full width included.
Layers with equal specs are measured once. The whole model is measured too,
a few runs after each layer spec. Times are medians; with one thread on the
CPU provider they are CPU times of the running thread, so that other
processes on a shared machine do not count.

Prediction. With ``T`` the summed layer times at the given widths and ``T0``
at full widths, ``predict = full_ms * T / T0`` (:attr:`scale` = ``full_ms /
T0``). Between sampled widths a layer's time is interpolated piecewise
linearly per axis (bilinear over ``(cin, cout)``, exact at the samples; the
end segments are extended below the smallest sample). Scaling the measured
model by its layers assumes that what the model spends outside them (norms,
activations, adds, pooling, the ``run()`` overhead: 7% of DeiT-S, 0-3% of
ResNet-50) shrinks in proportion; it predicted pruned ResNet-50 and DeiT-S
best in ``benchmarks/latency_table_validation.py``, and a uniform change of
machine load between the layer and the model measurements cancels in it. A
table restricted to some ``layers`` predicts ``full_ms - (T0 - T)`` instead
(the rest of the model stays as measured).

Precision. ``precision='int8'`` measures every graph (layers and model)
quantized as ``tools/export_onnx.py --int8`` quantizes (static QDQ,
per-channel weights; :func:`cpd_mm.deploy.layer_timing.deployed_graph`),
so that pruning with ``target='latency'`` picks the structure that is
fastest in the deployed precision; the (de)quantization at the edges of a
layer graph is left out of its time. Tables are cached per precision.

Caveats. On the CPU provider a conv whose channel counts are not multiples
of :attr:`LatencyTable.channel_block` leaves onnxruntime's blocked NCHWc
kernels for a slower path inside a model; the table interpolates as if it
did not (ResNet-50 pruned at random widths: 17% slower than with multiples
of 8, predicted 15% too fast), so prune in multiples of that block
(``round_to``). Modules in :attr:`LatencyTable.uncovered`
(``nn.MultiheadAttention``, transposed and 3-d convs) are not timed, and
attention written as matmul + softmax is not found: their time counts as
time outside the layers.
"""
import hashlib
import json
import os
import os.path as osp
import platform
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from mmengine.logging import print_log
from torch import nn

from .atomic import atomic_output
from .benchmark import require_onnxruntime
from .layer_specs import discover_layers, interpolate, output_size, widths_of
from .layer_timing import PRECISIONS, LayerTimer, measure_table

__all__ = ['LatencyTable', 'default_cache_dir', 'choose_providers',
           'FORMAT', 'METHODS']

FORMAT = 'cpd_mm.latency_table/v1'
#: part of the cache key: bump when what a measurement means changes
MEASUREMENT_VERSION = 1
#: ways of turning layer times into a model time, see LatencyTable.predict
METHODS = ('ratio', 'difference', 'activation')
_CPU = 'CPUExecutionProvider'
_GPU_PROVIDERS = ('TensorrtExecutionProvider', 'CUDAExecutionProvider')


def default_cache_dir() -> str:
    """``${CPD_MM_CACHE:-~/.cache/cpd_mm}/latency``."""
    root = os.environ.get('CPD_MM_CACHE') or osp.expanduser('~/.cache/cpd_mm')
    return osp.join(root, 'latency')


def choose_providers(requested: Optional[Sequence[str]] = None,
                     logger=None) -> list:
    """Execution providers for the table, from what onnxruntime offers.

    By default the GPU providers that ``onnxruntime.get_available_providers()``
    lists (TensorRT, CUDA, in its priority order), then CPU; others (e.g.
    Azure, which calls a remote endpoint) only when requested. Requested
    providers that this build lacks are dropped with a logged reason; the
    CPU provider always ends the list, so a session can fall back to it.
    """
    ort = require_onnxruntime()
    available = list(ort.get_available_providers())
    if requested:
        chosen = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            print_log(f'latency table: provider(s) {missing} not in this '
                      f'onnxruntime build ({available}); using '
                      f'{chosen or [_CPU]}', logger=logger, level=30)
    else:
        chosen = [p for p in available if p in _GPU_PROVIDERS]
    if _CPU not in chosen:
        chosen.append(_CPU)
    return chosen


def _cpu_info() -> dict:
    """CPU model and the SIMD flags that pick onnxruntime's kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, val = line.partition(':')
                if key.strip() == 'model name':
                    name = val.strip()
                elif key.strip() in ('flags', 'Features') and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    simd = sorted(flags & {'avx', 'avx2', 'fma', 'avx512f', 'avx512_vnni',
                           'avx512_bf16', 'amx_tile', 'asimd', 'sve'})
    return dict(model=name, machine=platform.machine(), simd=simd)


def _channel_block(providers: Sequence[str], cpu: dict) -> int:
    """Channel block of onnxruntime's NCHWc convs on this CPU (1: none)."""
    if providers[0] != _CPU:
        return 1
    if 'avx512f' in cpu['simd']:
        return 16
    return 8 if 'avx2' in cpu['simd'] else 1


def _forward_of(model):
    """The module whose forward maps an image tensor to the output."""
    from .wrappers import export_module
    try:
        return export_module(model)
    except TypeError:  # a plain nn.Module
        return model


def _discover(model, shape):
    """Layers called by one eval-mode forward of ``model`` at ``shape``."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = torch.randn(*shape, device=device)
    fwd = _forward_of(model)
    was_training = model.training
    model.eval()
    try:
        found = discover_layers(model, lambda: fwd(example), example)
    finally:
        model.train(was_training)
    return fwd, example, found


class LatencyTable:
    """Measured per-layer latencies of one model on one runtime.

    Build with :meth:`build`; the attributes are read-only views of
    :attr:`data` (a JSON-able dict, what the cache file holds).

    Attributes:
        full_ms (float): measured median latency of the whole model.
        provider (str): onnxruntime provider that ran the measurements.
        threads (int): intra-op threads.
        precision (str): ``'fp32'`` or ``'int8'``.
        clock (str): ``'cpu'`` (CPU time of the running thread; one thread
            on the CPU provider) or ``'wall'``.
        channel_block (int): channel multiple of the CPU's blocked conv
            kernels (8 on AVX2, 16 on AVX-512, 1 elsewhere).
        layers (dict): module name -> spec ids (one per call).
        attention_keys (list): attention cores: the innermost module that
            calls ``F.scaled_dot_product_attention`` (``#i`` appended for
            its further calls).
        uncovered (list): modules the table does not time.
    """

    def __init__(self, data: dict):
        if data.get('format') != FORMAT:
            raise ValueError(f'not a latency table of format {FORMAT}: '
                             f'{data.get("format")!r}')
        self.data = data
        specs = data['specs']
        self._axes = {k: s['axes'] for k, s in specs.items()}
        self._ms = {k: np.asarray(s['ms']) for k, s in specs.items()}
        self._entries = dict(data['layers'])
        self._entries.update({k: [s] for k, s in data['attention'].items()})
        self._full = {n: tuple(widths_of(specs[ids[0]]['spec']))
                      for n, ids in self._entries.items()}
        self._t0, self._o0 = self._sum(self._full)

    @classmethod
    def build(cls, model: nn.Module, input_shape: Sequence[int],
              layers: Optional[Sequence[str]] = None,
              providers: Optional[Sequence[str]] = None, threads: int = 1,
              cache_dir: Optional[str] = None, logger=None,
              samples: int = 5, rebuild: bool = False,
              precision: str = 'fp32') -> 'LatencyTable':
        """Measure (or load from the cache) the table of ``model``.

        Args:
            model: an MMPretrain classifier / MMSegmentation segmentor
                (timed through :func:`cpd_mm.deploy.export_module`) or any
                module taking one image tensor. Not changed (its training
                mode is restored).
            input_shape: full input shape, e.g. ``(1, 3, 224, 224)``.
            layers: restrict the table to these module names (and the
                attention cores inside them); default: all found.
            providers: onnxruntime providers (see :func:`choose_providers`).
            threads: intra-op threads (default 1).
            cache_dir: where tables are kept (default
                :func:`default_cache_dir`); ``False``: no cache. The file
                name hashes the model structure and layer specs, input
                shape, onnxruntime and torch versions, providers, threads,
                CPU model and SIMD flags, and ``samples``.
            logger: an mmengine logger, its name, or a ``logging.Logger``.
            samples: widths sampled per axis (2-6).
            rebuild: measure even when the cache has this table.
            precision: 'fp32' or 'int8' (graphs quantized as INT8 export
                does; part of the cache key).
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 3 or min(shape) < 1:
            raise ValueError('input_shape must be (N, C, *spatial) with '
                             f'positive sizes, but got {tuple(input_shape)}')
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, but '
                             f'got {precision!r}')
        if threads < 1 or not 2 <= samples <= 6:
            raise ValueError(f'need threads >= 1 and 2 <= samples <= 6, but '
                             f'got threads={threads}, samples={samples}')
        start = time.perf_counter()
        ort = require_onnxruntime()
        chosen = choose_providers(providers, logger)
        fwd, example, found = _discover(model, shape)
        found = _restrict(found, layers)
        if found['uncovered']:
            print_log(f'latency table: {len(found["uncovered"])} module(s) '
                      'of kinds it does not time, counted as time outside '
                      f'the layers: {found["uncovered"][:5]}',
                      logger=logger or 'current', level=30)
        cpu = _cpu_info()
        runtime = dict(onnxruntime=ort.__version__, torch=torch.__version__,
                       providers=chosen, threads=threads, cpu=cpu,
                       input_shape=list(shape), samples=samples,
                       precision=precision)
        key = hashlib.sha1(json.dumps(dict(
            format=FORMAT, measurement=MEASUREMENT_VERSION, model=repr(model),
            found=found, runtime=runtime),
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = None
        if cache_dir is not False:
            path = osp.join(cache_dir or default_cache_dir(),
                            f'{type(model).__name__}-{key}.json')
            if osp.isfile(path) and not rebuild:
                try:
                    table = cls.load(path)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    print_log(f'latency table: ignoring unreadable {path} '
                              f'({type(exc).__name__}: {exc}); measuring',
                              logger=logger, level=30)
                else:
                    print_log(f'latency table: loaded {path}',
                              logger=logger or 'current')
                    return table
        timer = LayerTimer(chosen, threads)
        try:
            data = measure_table(fwd, example, found, timer, samples,
                                 _channel_block(chosen, cpu), logger,
                                 precision=precision)
        finally:
            timer.close()
        if data['provider'] != chosen[0]:
            print_log(f'latency table: {chosen[0]} did not start (see '
                      f'onnxruntime\'s log); measured on {data["provider"]}',
                      logger=logger, level=30)
        data.update(format=FORMAT, key=key, runtime=runtime,
                    complete=layers is None,
                    build_s=time.perf_counter() - start)
        table = cls(data)
        print_log(f'latency table: {len(data["specs"])} layer specs, '
                  f'{timer.count} graphs in {data["build_s"]:.0f} s'
                  + (f'; saved {path}' if path else ''),
                  logger=logger or 'current')
        if path:
            table.save(path)
        return table

    @classmethod
    def load(cls, path: str) -> 'LatencyTable':
        with open(path) as f:
            return cls(json.load(f))

    def save(self, path: str) -> None:
        os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
        with atomic_output(path, force=True) as tmp, open(tmp, 'w') as f:
            json.dump(self.data, f, indent=1)

    # ------------------------------------------------------------ queries
    full_ms = property(lambda self: float(self.data['full_ms']))
    provider = property(lambda self: self.data['provider'])
    threads = property(lambda self: self.data['runtime']['threads'])
    clock = property(lambda self: self.data['clock'])
    precision = property(
        lambda self: self.data['runtime'].get('precision', 'fp32'))
    channel_block = property(lambda self: self.data['channel_block'])
    layers = property(lambda self: self.data['layers'])
    attention_keys = property(lambda self: list(self.data['attention']))
    uncovered = property(lambda self: self.data['uncovered'])

    @property
    def scale(self) -> float:
        """Model ms per summed layer ms, ``full_ms / T0`` (see
        :meth:`predict`): with the default ``'ratio'`` method a layer whose
        time drops by ``d`` ms makes the model ``scale * d`` ms faster."""
        return self.full_ms / self._t0 if self._t0 > 0 else 1.0

    def full_widths(self) -> Dict[str, tuple]:
        """Name -> full widths, for every layer and attention core."""
        return dict(self._full)

    def _time(self, sid: str, point) -> float:
        return interpolate(self._axes[sid], self._ms[sid], point)

    def layer(self, name: str, cin: int, cout: Optional[int] = None
              ) -> float:
        """Interpolated ms of module ``name`` (all its calls) at widths
        ``(cin, cout)``; a depthwise conv takes one width (``cin``)."""
        if name not in self.data['layers']:
            raise KeyError(f'{name!r} is not a layer of this latency table')
        if cout is None and len(self._full[name]) > 1:
            raise ValueError(f'{name!r} needs (cin, cout)')
        point = (cin, cout)[:len(self._full[name])]
        return sum(self._time(s, point) for s in self.data['layers'][name])

    def attention(self, key: str, heads: int, qk_dim: int, v_dim: int
                  ) -> float:
        """Interpolated ms of attention core ``key`` at ``heads`` heads of
        per-head widths ``qk_dim`` (q and k) and ``v_dim``."""
        if key not in self.data['attention']:
            raise KeyError(f'{key!r} is not an attention core of this table')
        return self._time(self.data['attention'][key], (heads, qk_dim, v_dim))

    def _sum(self, widths):
        """(summed layer ms, summed output elements) at ``widths``."""
        t = o = 0.0
        specs = self.data['specs']
        for name, ids in self._entries.items():
            for sid in ids:
                t += self._time(sid, widths[name])
                o += output_size(specs[sid]['spec'], widths[name])
        return t, o

    def predict(self, widths: Dict[str, Sequence[int]],
                method: Optional[str] = None) -> float:
        """Predicted whole-model ms with some layers at other widths.

        Args:
            widths: module name -> ``(cin, cout)`` (a depthwise conv: ``c``
                or ``(c, c)``), attention key -> ``(heads, qk_dim, v_dim)``;
                names not given stay at full width.
            method: with ``T`` / ``O`` the summed layer times / output
                elements at ``widths`` and ``T0`` / ``O0`` at full widths:
                ``'ratio'`` (default for a table of all layers):
                ``full_ms * T / T0``; ``'difference'`` (default for a table
                restricted by ``layers``): ``full_ms - (T0 - T)``;
                ``'activation'``: the difference, minus ``full_ms - T0``
                times ``1 - O / O0``.
        """
        method = method or ('ratio' if self.data['complete']
                            else 'difference')
        if method not in METHODS:
            raise ValueError(f'method must be one of {METHODS}, but got '
                             f'{method!r}')
        unknown = [n for n in widths if n not in self._full]
        if unknown:
            raise KeyError(f'{unknown} are neither layers nor attention '
                           'cores of this latency table')
        now = dict(self._full)
        for name, w in widths.items():
            w = (w, ) if np.isscalar(w) else tuple(w)
            now[name] = w[:len(self._full[name])]
        t, o = self._sum(now)
        if method == 'ratio':
            return self.scale * t
        pred = self.full_ms - (self._t0 - t)
        if method == 'activation' and self._o0 > 0:
            pred -= max(self.full_ms - self._t0, 0.0) * (1 - o / self._o0)
        return pred

    def widths_of_model(self, model: nn.Module) -> Dict[str, tuple]:
        """Widths of the table's layers in ``model`` (a pruned copy of the
        table's model, same module names), from one forward pass at the
        table's input shape."""
        _, _, found = _discover(model, self.data['runtime']['input_shape'])
        out = {}
        for name in self.data['layers']:
            if name not in found['layers']:
                raise KeyError(f'module {name!r} of the latency table is not '
                               'called by the given model')
            out[name] = widths_of(found['layers'][name][0])
        for key in self.data['attention']:
            if key not in found['attention']:
                raise KeyError(f'attention core {key!r} of the latency table '
                               'is not called by the given model')
            out[key] = widths_of(found['attention'][key])
        return out

    def predict_model(self, model: nn.Module,
                      method: Optional[str] = None) -> float:
        """:meth:`predict` with the widths of a pruned copy of the model."""
        return self.predict(self.widths_of_model(model), method)


def _restrict(found: dict, names: Optional[Sequence[str]]) -> dict:
    if names is None:
        return found
    owners = {k.split('#')[0] for k in found['attention']}
    unknown = [n for n in names if n not in found['layers'] and
               n not in owners]
    if unknown:
        raise ValueError(f'layers {unknown} are not conv/linear modules or '
                         'attention owners called by the model')
    keep = set(names)
    return dict(layers={n: s for n, s in found['layers'].items()
                        if n in keep},
                attention={k: s for k, s in found['attention'].items()
                           if k.split('#')[0] in keep},
                uncovered=found['uncovered'])
