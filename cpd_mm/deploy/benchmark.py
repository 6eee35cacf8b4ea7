"""Latency of an ONNX graph under onnxruntime."""
import time
from typing import List, Optional, Sequence

import numpy as np

from ..utils.progress import Progress

__all__ = ['require_onnxruntime', 'select_providers', 'create_session',
           'session_options', 'benchmark_session', 'benchmark_sessions',
           'latency_stats']

_CUDA = 'CUDAExecutionProvider'
_CPU = 'CPUExecutionProvider'
# Providers whose inputs and outputs live in CUDA memory.
_CUDA_MEMORY_PROVIDERS = (_CUDA, 'TensorrtExecutionProvider')


def require_onnxruntime():
    """Import onnxruntime or raise a clear ``ImportError``."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            'onnxruntime is not installed: `pip install onnxruntime` (CPU) or '
            '`pip install onnxruntime-gpu` (CUDA), or `pip install '
            'cpd_mm[cpu]` / `cpd_mm[gpu]`') from exc
    return onnxruntime


def select_providers(requested: Optional[Sequence[str]] = None) -> List[str]:
    """Execution providers to ask onnxruntime for, in priority order.

    ``requested`` (names as in ``onnxruntime.get_available_providers()``) is
    validated and returned with the CPU provider appended as fallback; by
    default CUDA is used when this onnxruntime build has it (onnxruntime-gpu),
    CPU otherwise.

    Raises:
        ValueError: a requested provider is not available in this build.
    """
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ValueError(
                f'execution provider(s) {missing} not available in this '
                f'onnxruntime build; available: {available}')
        providers = list(requested)
    else:
        providers = [_CUDA] if _CUDA in available else []
    if _CPU not in providers:
        providers.append(_CPU)
    return providers


def create_session(onnx_path: str,
                   providers: Optional[Sequence[str]] = None,
                   threads: int = 0):
    """An ``onnxruntime.InferenceSession`` with full graph optimisation.

    ``threads`` > 0 sets the intra-op thread pool size (0: onnxruntime's
    default, one thread per physical core). ``session.get_providers()[0]`` is
    the provider that actually runs the graph: onnxruntime silently falls back
    to CPU when a requested provider fails to initialise.
    """
    ort = require_onnxruntime()
    return ort.InferenceSession(
        onnx_path, sess_options=session_options(threads),
        providers=select_providers(providers))


def session_options(threads: int = 0):
    """The ``onnxruntime.SessionOptions`` of :func:`create_session`."""
    ort = require_onnxruntime()
    if threads < 0:
        raise ValueError(f'`threads` must be >= 0, but got {threads}')
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.intra_op_num_threads = threads
    # One request at a time: inter-op parallelism only adds scheduling noise.
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return options


def latency_stats(times_s: Sequence[float], batch: int) -> dict:
    """Summary of per-run wall times (seconds) in milliseconds.

    Returns:
        dict: ``runs``, ``mean_ms``, ``median_ms``, ``p90_ms``, ``p99_ms``,
        ``min_ms``, ``max_ms``, ``std_ms`` and ``throughput`` (images per
        second: ``batch`` / mean latency).
    """
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError('no timed runs')
    mean = float(ms.mean())
    return dict(
        runs=int(ms.size),
        mean_ms=mean,
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        min_ms=float(ms.min()),
        max_ms=float(ms.max()),
        std_ms=float(ms.std()),
        throughput=batch * 1e3 / mean if mean > 0 else float('inf'))


def _bind(ort, session, input_array):
    """IO binding of ``input_array`` and the outputs in provider memory."""
    provider = session.get_providers()[0]
    device = 'cuda' if provider in _CUDA_MEMORY_PROVIDERS else 'cpu'
    binding = session.io_binding()
    value = ort.OrtValue.ortvalue_from_numpy(
        np.ascontiguousarray(input_array, dtype=np.float32), device, 0)
    binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
    for out in session.get_outputs():
        binding.bind_output(out.name, device)

    def run_once():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    # keep `value` alive as long as the binding that points at it
    run_once.keepalive = value
    return run_once


def benchmark_sessions(sessions: Sequence,
                       input_array: np.ndarray,
                       runs: int = 1000,
                       warmup: int = 50,
                       progress: bool = True) -> List[dict]:
    """Time ``runs`` inferences of each session on ``input_array``.

    ``warmup`` untimed runs per session come first (memory arenas, kernel
    selection, CUDA context). The timed runs of several sessions are
    interleaved, in alternating order, so that a load change on a shared
    machine hits all of them alike and their ratio stays fair. Each run is
    measured separately with ``time.perf_counter``; the progress bar
    (mmengine ``ProgressBar``) is drawn between runs and is not part of any
    measurement. Inputs and outputs are bound once with IO binding in the
    provider's memory (device memory for CUDA), so the timings are of the
    graph, not of host<->device copies.

    Returns:
        list[dict]: per session, :func:`latency_stats` plus ``provider``
        (the one that ran), ``providers`` (the session's list), ``warmup``,
        ``batch`` and ``threads`` (intra-op setting, 0 = default).
    """
    ort = require_onnxruntime()
    if runs < 1 or warmup < 0:
        raise ValueError(f'need runs >= 1 and warmup >= 0, but got runs={runs}'
                         f', warmup={warmup}')
    runners = [_bind(ort, s, input_array) for s in sessions]
    for run_once in runners:
        for _ in range(warmup):
            run_once()
    bar = Progress(runs, 'runs', prefix='benchmark: ') if progress else None
    times = [[] for _ in runners]
    order = list(range(len(runners)))
    for i in range(runs):
        for k in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - start)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    batch = int(input_array.shape[0])
    results = []
    for session, t in zip(sessions, times):
        stats = latency_stats(t, batch=batch)
        stats.update(
            provider=session.get_providers()[0],
            providers=list(session.get_providers()),
            warmup=warmup,
            batch=batch,
            threads=int(session.get_session_options().intra_op_num_threads))
        results.append(stats)
    return results


def benchmark_session(session, input_array: np.ndarray, runs: int = 1000,
                      warmup: int = 50, progress: bool = True) -> dict:
    """:func:`benchmark_sessions` for one session."""
    return benchmark_sessions([session], input_array, runs, warmup,
                              progress)[0]
