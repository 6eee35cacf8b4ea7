"""Run a test function in several processes of a real gloo process group.

    from dist_utils import run_distributed

    def _check(rank, work_dir):     # module level: the processes import it
        runner = Runner(..., launcher='pytorch')   # really distributed
        ...
        return something_picklable

    def test_x(tmp_path):
        rank0, rank1 = run_distributed(_check, tmp_path, world_size=2)

Each rank is a fresh interpreter started like ``torchrun`` starts one
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``; one OpenMP thread; no GPU visible). Its gloo process
group is initialised before ``fn(rank, *args, **kwargs)`` runs, so an
mmengine ``Runner`` built with ``launcher='pytorch'`` is distributed and
starts no launcher of its own (``Runner.setup_env`` calls ``init_dist``,
which would call ``torch.cuda.set_device``, only when no group exists).

One adaptation to CPU: mmengine's ``wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to ``MMDistributedDataParallel``, which torch
refuses for a module on the CPU; in these processes
``MMDistributedDataParallel`` drops ``device_ids`` for CPU modules (the
wrapper is otherwise the real one).

Failures surface in the caller as :class:`DistributedError` with each
failing rank's traceback and the tail of its output; a rank that outlives
``timeout`` (e.g. waiting in a collective for a rank that died) is killed.
"""
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List

__all__ = ['run_distributed', 'DistributedError']

# After the first rank fails, the others get this long to finish or fail
# on their own (their error is often the consequence) before being killed.
_GRACE_S = 10.0


class DistributedError(RuntimeError):
    """A rank of :func:`run_distributed` failed or timed out."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _allow_cpu_ddp() -> None:
    """Let MMDistributedDataParallel wrap CPU modules (see module doc)."""
    from mmengine.model import MMDistributedDataParallel
    init = MMDistributedDataParallel.__init__

    def __init__(self, module, *args, **kwargs):
        if all(p.device.type == 'cpu' for p in module.parameters()):
            kwargs['device_ids'] = kwargs['output_device'] = None
        init(self, module, *args, **kwargs)

    MMDistributedDataParallel.__init__ = __init__


def _child(task_file: str, rank: int) -> None:
    """Entry point of one rank: run the task, write its result, exit."""
    with open(task_file, 'rb') as f:
        fn, args, kwargs, timeout = pickle.load(f)
    import torch.distributed as dist
    _allow_cpu_ddp()
    dist.init_process_group('gloo', init_method='env://', rank=rank,
                            world_size=int(os.environ['WORLD_SIZE']),
                            timeout=timedelta(seconds=timeout))
    try:
        result = ('ok', fn(rank, *args, **kwargs))
    except BaseException:  # noqa: B902  (reported to the caller)
        result = ('error', traceback.format_exc())
    out = f'{task_file}.rank{rank}'
    with open(out + '.tmp', 'wb') as f:
        pickle.dump(result, f)
    os.replace(out + '.tmp', out)
    if result[0] == 'ok':
        dist.destroy_process_group()
    sys.exit(0 if result[0] == 'ok' else 1)


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors='replace') as f:
        return f.read()[-n:]


def run_distributed(fn: Callable[..., Any], *args, world_size: int = 2,
                    timeout: float = 120, env: dict = None,
                    **kwargs) -> List[Any]:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` gloo ranks.

    Args:
        fn: a module-level function (the ranks import it by name); its
            arguments and return value must pickle.
        world_size: number of processes.
        timeout: seconds for the whole run, and for any collective.
        env: extra environment variables for every rank.

    Returns:
        The return values, in rank order.

    Raises:
        DistributedError: a rank raised (its traceback is in the message)
            or did not finish within ``timeout``.
    """
    with tempfile.TemporaryDirectory(prefix='dist_') as tmp:
        task = os.path.join(tmp, 'task.pkl')
        with open(task, 'wb') as f:
            pickle.dump((fn, args, kwargs, timeout), f)
        port = _free_port()
        procs, logs = [], []
        for rank in range(world_size):
            rank_env = dict(
                os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                RANK=str(rank), WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
                PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                **(env or {}))
            logs.append(os.path.join(tmp, f'rank{rank}.log'))
            code = (f'import {__name__} as m; '
                    f'm._child({task!r}, {rank})')
            with open(logs[-1], 'w') as log:
                procs.append(subprocess.Popen(
                    [sys.executable, '-c', code], env=rank_env,
                    stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        first = None  # the rank that failed first: likely the root cause
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if first is None:
                first = next((r for r, p in enumerate(procs) if p.poll()),
                             None)
                failed_at = now  # read only once ``first`` is set
            if now > deadline or (first is not None and
                                  now > failed_at + _GRACE_S):
                break
            time.sleep(0.2)
        if first is None:  # all ended before a poll saw one fail
            first = next((r for r, p in enumerate(procs) if p.returncode),
                         None)
        stuck = [r for r, p in enumerate(procs) if p.poll() is None]
        for rank in stuck:
            procs[rank].kill()
            procs[rank].wait()
        results, problems = [], []
        for rank in range(world_size):
            path = f'{task}.rank{rank}'
            if os.path.exists(path):
                with open(path, 'rb') as f:
                    status, value = pickle.load(f)
            elif rank in stuck:
                status, value = 'error', (
                    f'killed: still running after {timeout} s' if first is
                    None else f'killed: still running {_GRACE_S:.0f} s '
                    f'after rank {first} failed')
            else:
                status, value = 'error', \
                    f'exited with {procs[rank].returncode} before fn ended'
            if status != 'ok':
                output = _tail(logs[rank])
                problem = f'--- rank {rank}' + (
                    ' (failed first)' if rank == first else '') + \
                    f': {value}' + (f'\n--- rank {rank} output (tail):\n'
                                    f'{output}' if output.strip() else '')
                problems.insert(0 if rank == first else len(problems),
                                problem)
            results.append(value)
        if problems:
            raise DistributedError(
                f'{len(problems)} of {world_size} ranks failed:\n' +
                '\n'.join(problems))
        return results
