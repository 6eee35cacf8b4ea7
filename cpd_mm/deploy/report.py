"""Human tables and machine-readable JSON for export / benchmark results."""
import json
import math
from typing import List, Optional, Sequence

from .atomic import atomic_output
from .complexity import format_count

__all__ = ['format_table', 'latency_summary', 'comparison',
           'comparison_table',
           'write_json', 'JSON_SCHEMA_VERSION']

#: Bumped when a key of the JSON report changes meaning or disappears.
JSON_SCHEMA_VERSION = 1

_LATENCY_ROWS = (('latency mean', 'mean_ms'), ('latency median', 'median_ms'),
                 ('latency p90', 'p90_ms'), ('latency p99', 'p99_ms'),
                 ('latency min', 'min_ms'))


def format_table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    """Plain-text table, first column left-aligned, the others right."""
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row):
        return '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    rule = '  '.join('-' * w for w in widths)
    return '\n'.join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def latency_summary(stats: dict) -> str:
    """One model's benchmark as a two-column table."""
    rows = [(name, f'{stats[key]:.3f} ms') for name, key in _LATENCY_ROWS]
    rows.append(('throughput', f'{stats["throughput"]:.1f} img/s'))
    rows.append(('runs / warm-up', f'{stats["runs"]} / {stats["warmup"]}'))
    rows.append(('provider', stats['provider']))
    return format_table(('metric', 'value'), rows)


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


def comparison(original: dict, pruned: dict) -> dict:
    """Ratios original / pruned (> 1 means the pruned model is smaller/faster).

    Both arguments hold ``params``, ``flops`` and ``benchmark`` (the dict of
    :func:`cpd_mm.deploy.benchmark.benchmark_session`).
    """
    bo, bp = original['benchmark'], pruned['benchmark']
    return dict(
        params_ratio=_ratio(original['params'], pruned['params']),
        flops_ratio=_ratio(original['flops'], pruned['flops']),
        speedup_mean=_ratio(bo['mean_ms'], bp['mean_ms']),
        speedup_median=_ratio(bo['median_ms'], bp['median_ms']),
        params_removed=1 - pruned['params'] / original['params']
        if original['params'] else None,
        flops_removed=1 - pruned['flops'] / original['flops']
        if original['flops'] else None)


def comparison_table(original: dict, pruned: dict) -> str:
    """Side-by-side table: parameters, FLOPs, latency and speed-up."""

    def ratio(a, b):
        r = _ratio(a, b)
        return f'{r:.2f}x' if r is not None and math.isfinite(r) else '-'

    bo, bp = original['benchmark'], pruned['benchmark']
    rows = [('parameters', format_count(original['params']),
             format_count(pruned['params']),
             ratio(original['params'], pruned['params'])),
            ('FLOPs', format_count(original['flops']),
             format_count(pruned['flops']),
             ratio(original['flops'], pruned['flops']))]
    for name, key in _LATENCY_ROWS:
        rows.append((name, f'{bo[key]:.3f} ms', f'{bp[key]:.3f} ms',
                     ratio(bo[key], bp[key])))
    rows.append(('throughput', f'{bo["throughput"]:.1f} img/s',
                 f'{bp["throughput"]:.1f} img/s',
                 ratio(bp['throughput'], bo['throughput'])))
    table = format_table(('', 'original', 'pruned', 'original/pruned'), rows)
    return (f'{table}\nspeed-up (median latency): '
            f'{ratio(bo["median_ms"], bp["median_ms"])}, provider '
            f'{bp["provider"]}, batch {bp["batch"]}, {bp["runs"]} runs')


def write_json(report: dict, path: str, force: bool = False) -> None:
    """Write ``report`` as indented JSON via a temporary file and rename."""
    with atomic_output(path, force) as tmp:
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=2, sort_keys=False)
            f.write('\n')
