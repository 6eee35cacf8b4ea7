"""Time layers (one- or few-node ONNX graphs) and whole models with
onnxruntime, for :mod:`cpd_mm.deploy.latency_table`.

A layer is rebuilt as an equivalent torch module at the widths to measure
(:func:`cpd_mm.deploy.layer_specs.build_layer`), exported with the same
exporter and opset as whole models (:func:`export_graph`), and timed by a
:class:`LayerTimer`. What a one-layer graph measures that a whole model does
not, and what is done about it (CPU provider):

- *layout reorders*: onnxruntime runs convs in the blocked NCHWc layout and
  inserts ``ReorderInput`` / ``ReorderOutput`` nodes where a graph enters and
  leaves it. In a one-conv graph they cost up to a fifth of a small conv; in
  a whole CNN they occur once. Likewise a ``Reshape`` that makes a graph's
  output is a copy (5% of a ViT linear), inside a model a free view. Layer
  times on the CPU provider therefore come from onnxruntime's own profiler:
  the summed kernel times of the graph's nodes without
  :data:`EXCLUDED_OPS`, and without the fixed cost of a ``run()`` call,
  which a model pays once.
- *caches*: the graphs of one layer's width grid run interleaved, one run
  per visit, so a layer's weights are cold as in a model (measured on
  ResNet-50: timing a graph twice in a row and keeping the second run made
  narrow layers 5-20% faster than inside the model; interleaving kept the
  pruned/full ratio within 2% of it).
- *a shared machine*: with one thread, onnxruntime runs in the calling
  thread, so the CPU time of that thread is what a run costs; time slices
  given to other processes are not (:func:`clock_for`). Contention for
  memory and caches with processes on other cores still shows.
- fusions (conv + activation + residual add, MatMul + bias) and the ops
  between layers are left to the prediction (see
  :meth:`cpd_mm.deploy.LatencyTable.predict`).

Other providers (CUDA, TensorRT) fuse or launch asynchronously, so their
per-node profile is not a kernel time: there the wall time of ``run()`` is
used, with inputs and outputs bound in device memory (:func:`bound_runner`).
That path could not be run where this was written (no GPU).
"""
import json
import os
import os.path as osp
import shutil
import tempfile
import time
import warnings
from itertools import product
from typing import List, Sequence

import numpy as np
import torch
from mmengine.logging import print_log
from torch import nn

from .benchmark import (_CPU, _CUDA_MEMORY_PROVIDERS, create_session,
                        require_onnxruntime, session_options)
from ..utils.progress import Progress
from .layer_specs import build_layer, spec_axes, spec_id
from .onnx_export import DEFAULT_OPSET, ExportError
from .rewrites import exportable_modules

__all__ = ['export_graph', 'LayerTimer', 'profile_node_times',
           'time_sessions', 'bound_runner', 'clock_for', 'measure_table',
           'deployed_graph', 'EXCLUDED_OPS', 'PRECISIONS']

#: Ops left out of a layer's time: NCHWc layout changes and views, and the
#: (de)quantization at the edges of an INT8 layer graph (inside an INT8
#: model, integer layers feed each other without them).
EXCLUDED_OPS = ('ReorderInput', 'ReorderOutput', 'Reshape', 'Squeeze',
                'Unsqueeze', 'Flatten', 'Identity', 'QuantizeLinear',
                'DequantizeLinear')
#: precisions a table can be measured in
PRECISIONS = ('fp32', 'int8')


def export_graph(module: nn.Module, inputs: Sequence[torch.Tensor],
                 path: str, opset: int = DEFAULT_OPSET) -> str:
    """Export ``module(*inputs)`` (in eval mode) to ``path``.

    Same settings as :func:`cpd_mm.deploy.export_onnx` (TorchScript-based
    ``torch.onnx.export``, constant folding, the export stand-ins of
    :mod:`cpd_mm.deploy.rewrites`), without the checks that a published file
    gets. Inputs are named ``input0``, ``input1``, ... The module's training
    mode is restored afterwards.
    """
    was_training = module.training
    names = [f'input{i}' for i in range(len(inputs))]
    try:
        with warnings.catch_warnings(), exportable_modules(module), \
                torch.no_grad():
            warnings.simplefilter('ignore', DeprecationWarning)
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.simplefilter('ignore', UserWarning)
            torch.onnx.export(module.eval(), tuple(inputs), path,
                              dynamo=False, opset_version=opset,
                              input_names=names, do_constant_folding=True)
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = str(exc).split(' [Caused by')[0].strip()
        raise ExportError(f'cannot export {type(module).__name__} for '
                          f'timing: {reason}') from exc
    finally:
        module.train(was_training)
    return path


def deployed_graph(module: nn.Module, inputs: Sequence[torch.Tensor],
                   path: str, precision: str = 'fp32') -> str:
    """:func:`export_graph`, then, for ``precision='int8'``, quantized as
    INT8 export does (static QDQ, per-channel weights, calibrated on
    ``inputs``: the values do not matter for timing, the kernels do)."""
    export_graph(module, inputs, path)
    if precision == 'int8':
        from .quantize import quantize_for_timing
        fp32 = path + '.fp32'
        os.replace(path, fp32)
        names = [f'input{i}' for i in range(len(inputs))]
        feeds = [{n: x.detach().cpu().numpy() for n, x in zip(names,
                                                              inputs)}]
        try:
            quantize_for_timing(fp32, path, feeds)
        finally:
            os.remove(fp32)
    return path


def profile_node_times(profile_path: str, skip: int = 0,
                       exclude_ops: Sequence[str] = EXCLUDED_OPS) -> dict:
    """Per-node kernel times (ms) from an onnxruntime profile JSON.

    Args:
        profile_path: what ``session.end_profiling()`` returned.
        skip: drop each node's first ``skip`` runs (the warm-up).
        exclude_ops: op types left out of ``per_run``.

    Returns:
        dict: ``nodes`` (node name -> ``(op type, list of ms per run)``) and
        ``per_run`` (array: summed kernel ms per run over the kept nodes).
    """
    with open(profile_path) as f:
        events = json.load(f)
    nodes = {}
    for e in events:
        if e.get('cat') != 'Node' or not e.get('name', '').endswith(
                '_kernel_time'):
            continue
        name = e['name'][:-len('_kernel_time')]
        op = e.get('args', {}).get('op_name', '')
        nodes.setdefault(name, (op, []))[1].append(e['dur'] / 1e3)
    kept = [ms[skip:] for op, ms in nodes.values() if op not in exclude_ops]
    runs = min((len(ms) for ms in kept), default=0)
    per_run = (np.sum([ms[:runs] for ms in kept], axis=0)
               if kept and runs else np.zeros(0))
    return dict(nodes=nodes, per_run=np.asarray(per_run, dtype=np.float64))


def clock_for(provider: str, threads: int) -> str:
    """``'cpu'`` when onnxruntime runs in the calling thread alone (CPU
    provider, one intra-op thread): that thread's CPU time is the latency
    the run would have on an otherwise idle core. ``'wall'`` otherwise."""
    return 'cpu' if provider == _CPU and threads == 1 else 'wall'


def bound_runner(session, feed: dict, device: str):
    """``run()`` of ``session`` with inputs and outputs bound once in
    ``device`` memory (``'cuda'``, or ``'cpu'``): a GPU timing then holds no
    host<->device copies. Returns a callable that runs and synchronises."""
    ort = require_onnxruntime()
    binding = session.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(
        np.ascontiguousarray(a), device, 0) for a in feed.values()]
    for name, value in zip(feed, values):
        binding.bind_ortvalue_input(name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.keepalive = values  # the binding points at them
    run.binding = binding
    return run


def _runner(session, feed):
    if session.get_providers()[0] in _CUDA_MEMORY_PROVIDERS:
        return bound_runner(session, feed, 'cuda')
    return lambda: session.run(None, feed)


def time_sessions(sessions: Sequence, feeds: Sequence[dict], runs: int
                  ) -> List[tuple]:
    """Run each session ``runs`` times, interleaved in alternating order
    (CUDA / TensorRT sessions through :func:`bound_runner`).

    Returns:
        list: per session, ``(wall_ms, cpu_ms)`` arrays: wall time and CPU
        time of the calling thread of each run.
    """
    runners = [_runner(s, f) for s, f in zip(sessions, feeds)]
    walls = [[] for _ in sessions]
    cpus = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(runs):
        for k in (order if r % 2 == 0 else order[::-1]):
            w0, c0 = time.perf_counter(), time.thread_time()
            runners[k]()
            c1, w1 = time.thread_time(), time.perf_counter()
            walls[k].append((w1 - w0) * 1e3)
            cpus[k].append((c1 - c0) * 1e3)
    return [(np.asarray(w), np.asarray(c)) for w, c in zip(walls, cpus)]


class LayerTimer:
    """Times small ONNX graphs on one onnxruntime provider.

    Args:
        providers: execution providers, in priority order.
        threads: intra-op threads (1 by default, as the project's
            benchmarks use).
        min_runs, max_runs: timed runs per graph.
        budget_ms: aim for about this much timed time per graph (the run
            count is picked from a first run, within the bounds above).
        warmup: untimed runs per graph (allocation, weight pre-packing).

    Attributes:
        provider (str): the provider that ran the last graphs.
        mode (str): ``'profile'`` (CPU: profiled kernel times without
            :data:`EXCLUDED_OPS`) or ``'wall'`` (others).
        clock (str): see :func:`clock_for`; with ``'cpu'`` profiled times
            are scaled by each run's CPU time / wall time.
        count (int): graphs measured so far (tests use it to see a cache
            hit).
    """

    def __init__(self, providers: Sequence[str], threads: int = 1,
                 min_runs: int = 5, max_runs: int = 40,
                 budget_ms: float = 40.0, warmup: int = 2):
        if threads < 1:
            raise ValueError(f'`threads` must be >= 1, but got {threads}')
        if not 1 <= min_runs <= max_runs or warmup < 0:
            raise ValueError('need 1 <= min_runs <= max_runs and warmup >= 0'
                             f', but got {min_runs}, {max_runs}, {warmup}')
        self.providers, self.threads = list(providers), threads
        self.min_runs, self.max_runs = min_runs, max_runs
        self.budget_ms, self.warmup = budget_ms, warmup
        self.provider = self.mode = self.clock = None
        self.count = 0
        self._tmp = tempfile.mkdtemp(prefix='cpd_mm_layer_timing_')

    def _session(self, path, profile):
        ort = require_onnxruntime()
        options = session_options(self.threads)
        options.enable_profiling = profile
        options.profile_file_prefix = osp.join(
            self._tmp, osp.splitext(osp.basename(path))[0])
        return ort.InferenceSession(path, sess_options=options,
                                    providers=self.providers)

    def time_graphs(self, graphs: Sequence[tuple]) -> List[np.ndarray]:
        """Time several graphs, interleaved run by run.

        Args:
            graphs: ``(onnx_path, [numpy inputs])`` pairs.

        Returns:
            list of arrays: per graph, the ms of each timed run.
        """
        probe = create_session(graphs[0][0], self.providers, self.threads)
        self.provider = probe.get_providers()[0]
        self.mode = 'profile' if self.provider == _CPU else 'wall'
        self.clock = clock_for(self.provider, self.threads)
        del probe
        profile = self.mode == 'profile'
        sessions = [self._session(path, profile) for path, _ in graphs]
        feeds = [{i.name: a for i, a in zip(s.get_inputs(), arrays)}
                 for s, (_, arrays) in zip(sessions, graphs)]
        first = []  # warm-up, then one run to choose the run count
        for s, feed in zip(sessions, feeds):
            for _ in range(self.warmup):
                s.run(None, feed)
            first.append(time_sessions([s], [feed], 1)[0][1][0])
        runs = int(np.clip(self.budget_ms * len(graphs) / max(sum(first),
                                                              1e-3),
                           self.min_runs, self.max_runs))
        timed = time_sessions(sessions, feeds, runs)
        self.count += len(graphs)
        if not profile:
            return [cpu if self.clock == 'cpu' else wall
                    for wall, cpu in timed]
        out = []
        for s, (wall, cpu) in zip(sessions, timed):
            path = s.end_profiling()
            # the warm-up and the first run are profiled too
            kernels = profile_node_times(
                path, skip=self.warmup + 1)['per_run'][:runs]
            os.remove(path)
            if self.clock == 'cpu':  # time slices of other processes
                kernels = kernels * np.minimum(cpu / np.maximum(wall, 1e-9),
                                               1.0)
            out.append(kernels)
        return out

    def tmp_path(self, name: str) -> str:
        """A path for a graph file in this timer's scratch directory."""
        return osp.join(self._tmp, name)

    def close(self):
        """Remove the scratch directory."""
        shutil.rmtree(self._tmp, ignore_errors=True)


class _FullModel:
    """The whole model, run a few times after each layer spec so that its
    latency is sampled under the same machine load as the layers'."""

    def __init__(self, fwd, example, timer, precision='fp32'):
        path = timer.tmp_path('full_model.onnx')
        deployed_graph(fwd, [example], path, precision)
        self.session = create_session(path, timer.providers, timer.threads)
        os.remove(path)
        self.feed = {self.session.get_inputs()[0].name:
                     example.detach().cpu().numpy()}
        self.provider = self.session.get_providers()[0]
        self.clock = clock_for(self.provider, timer.threads)
        for _ in range(3):
            self.session.run(None, self.feed)
        self.wall, self.cpu = [], []

    def sample(self, runs):
        if runs > 0:
            wall, cpu = time_sessions([self.session], [self.feed], runs)[0]
            self.wall += wall.tolist()
            self.cpu += cpu.tolist()

    def stats(self) -> dict:
        main = self.cpu if self.clock == 'cpu' else self.wall
        return dict(provider=self.provider, clock=self.clock,
                    runs=len(main), median_ms=float(np.median(main)),
                    iqr_ms=float(np.subtract(*np.percentile(main, [75, 25]))),
                    wall_median_ms=float(np.median(self.wall)),
                    cpu_median_ms=float(np.median(self.cpu)))


def measure_table(fwd: nn.Module, example: torch.Tensor, found: dict,
                  timer: LayerTimer, samples: int, block: int,
                  logger=None, full_runs: int = 20,
                  precision: str = 'fp32') -> dict:
    """Time every distinct spec of ``found`` on its grid, and the model.

    Args:
        fwd: the module exported as the whole model.
        example: its input.
        found: :func:`cpd_mm.deploy.layer_specs.discover_layers` output.
        timer: times the layer graphs.
        samples, block: widths per axis and channel block
            (:func:`cpd_mm.deploy.layer_specs.spec_axes`).
        full_runs: whole-model runs, spread over the build.
        precision: 'fp32', or 'int8': every graph (layers and model)
            quantized (:func:`deployed_graph`).

    Returns:
        dict: the measured part of a latency table's data (``specs``,
        ``layers``, ``attention``, ``full_ms``, ``full``, ...).
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, but got '
                         f'{precision!r}')
    full = _FullModel(fwd, example, timer, precision)
    specs, layer_ids, attn_ids = {}, {}, {}
    for name, calls in found['layers'].items():
        layer_ids[name] = [spec_id(s) for s in calls]
        specs.update((spec_id(s), s) for s in calls)
    for key, s in found['attention'].items():
        attn_ids[key] = spec_id(s)
        specs[spec_id(s)] = s
    grids = {sid: spec_axes(s, samples, block) for sid, s in specs.items()}
    progress = Progress(sum(int(np.prod([len(a) for a in g]))
                            for g in grids.values()), 'graphs timed', logger,
                        prefix='latency table: ')
    per_spec = -(-full_runs // max(len(specs), 1))
    out = {}
    for sid, spec in specs.items():
        points = list(product(*grids[sid]))
        graphs = []
        for i, p in enumerate(points):
            module, inputs = build_layer(spec, p)
            path = deployed_graph(module, inputs,
                                  timer.tmp_path(f'{sid}_{i}.onnx'),
                                  precision)
            graphs.append((path, [x.numpy() for x in inputs]))
        runs = timer.time_graphs(graphs)
        shape = [len(a) for a in grids[sid]]
        out[sid] = dict(
            spec=spec, axes=grids[sid],
            ms=np.reshape([np.median(r) for r in runs], shape).tolist(),
            iqr_ms=np.reshape([np.subtract(*np.percentile(r, [75, 25]))
                               for r in runs], shape).tolist(),
            runs=int(len(runs[0])))
        for path, _ in graphs:
            os.remove(path)
        progress.update(len(points))
        full.sample(per_spec)
    progress.close()
    full.sample(full_runs - len(full.wall))
    stats = full.stats()
    return dict(specs=out, layers=layer_ids, attention=attn_ids,
                uncovered=found['uncovered'], provider=stats['provider'],
                clock=stats['clock'], mode=timer.mode or 'none',
                channel_block=block, precision=precision,
                full_ms=stats['median_ms'], full=stats,
                graphs=timer.count)
