"""Markdown report of ``benchmarks/zoo_coverage.json`` (docs/zoo_coverage.md).

The table has one row per model (codebase, family, input, status, share of
channels frozen, FLOPs kept at the random plan, comb seconds, groups and the
main frozen reasons); a summary counts statuses and bins the FLOPs kept, and
a failure section gives each failing model's error and where it was raised.
"""
from collections import Counter, defaultdict

from zoo_util import reason_kind

ORDER = ('exact', 'differs', 'raises', 'comb fails', 'build fails',
         'forward fails', 'timeout', 'crashed', 'skipped')
FLOPS_BINS = ((0.3, '<= 30%'), (0.45, '30-45%'), (0.6, '45-60%'),
              (0.8, '60-80%'), (1.01, '> 80%'))


def _pct(x):
    return '' if x is None else f'{100 * x:.0f}%'


def _status(r):
    s = r.get('status', '?')
    if s == 'differs' and r.get('max_rel_diff') is not None:
        s += f' ({r["max_rel_diff"]:.1e})'
    if r.get('float64_error'):
        s += ' [fp32; float64 raises]'
    elif r.get('dtype') == 'float32' and s.startswith(('exact', 'differs')):
        s += ' [fp32]'
    return s


def _mixed(r):
    m = r.get('mixed')
    if not m:
        return ''
    s = m['status']
    if s == 'differs' and m.get('max_rel_diff') is not None:
        s += f' ({m["max_rel_diff"]:.1e})'
    return s


def main_reasons(r, n=2, width=90):
    """The ``n`` frozen reasons holding the most channels, excluding the
    model's output (always frozen)."""
    out = []
    for reason, count in r.get('frozen_reasons', {}).items():
        if reason.startswith('model output'):
            continue
        out.append(f'{reason} ({count})')
        if len(out) == n:
            break
    text = '; '.join(out)
    return text if len(text) <= width else text[:width - 3] + '...'


def summary(results):
    """Counts per status and codebase, FLOPs-kept bins of exact models."""
    lines = []
    by_cb = defaultdict(Counter)
    for r in results.values():
        by_cb[r['codebase']][r['status']] += 1
    total = Counter()
    for c in by_cb.values():
        total.update(c)
    cols = [s for s in ORDER if total[s]]
    lines.append('| codebase | ' + ' | '.join(cols) + ' | all |')
    lines.append('|---' * (len(cols) + 2) + '|')
    for cb in sorted(by_cb):
        c = by_cb[cb]
        lines.append(f'| {cb} | ' + ' | '.join(str(c[s]) for s in cols) +
                     f' | {sum(c.values())} |')
    lines.append('| **all** | ' + ' | '.join(str(total[s]) for s in cols) +
                 f' | {sum(total.values())} |')
    exact = [r for r in results.values()
             if r['status'] == 'exact' and r.get('flops_kept') is not None]
    if exact:
        bins = Counter()
        for r in exact:
            bins[next(lbl for hi, lbl in FLOPS_BINS
                      if r['flops_kept'] <= hi)] += 1
        lines.append('')
        lines.append('FLOPs kept (cost model) at the random 50% plan, exact '
                     'models: ' + ', '.join(f'{lbl}: {bins[lbl]}'
                                            for _, lbl in FLOPS_BINS) +
                     f' (of {len(exact)}).')
        over = sum(r['flops_kept'] > 0.6 for r in exact)
        lines.append(f'Exact but keeping > 60% of FLOPs: {over}.')
    kinds = Counter()
    for r in results.values():
        kinds.update({reason_kind(reason) for reason in r.get(
            'frozen_reasons', {}) if not reason.startswith('model output')})
    if kinds:
        lines.append('')
        lines.append('Frozen reasons by the number of models they occur in '
                     '(module names replaced by `*`):')
        lines.append('')
        for k, c in kinds.most_common(12):
            lines.append(f'- {c}: {k}')
    return lines


def table(results):
    lines = ['| model | codebase | input | status | mixed plan | frozen | '
             'FLOPs kept (cost model / mmengine) | comb s | groups '
             '(prunable) | main frozen reasons (channels) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for key in sorted(results, key=lambda k: (results[k]['codebase'], k)):
        r = results[key]
        flops = _pct(r.get('flops_kept'))
        if r.get('mmengine_flops_kept') is not None:
            flops += f' / {_pct(r["mmengine_flops_kept"])}'
        groups = (f'{r["groups"]} ({r["prunable_groups"]})'
                  if 'groups' in r else '')
        inp = f'{r["input"]}' if r.get('input') else ''
        lines.append(
            f'| {r["family"]}: `{r["model"]}` | {r["codebase"]} | {inp} | '
            f'{_status(r)} | {_mixed(r)} | {_pct(r.get("frozen_share"))} | '
            f'{flops} | '
            f'{r.get("comb_s", "")} | {groups} | '
            f'{main_reasons(r).replace("|", "/")} |')
    return lines


def failures(results):
    lines = []
    for key in sorted(results):
        r = results[key]
        for plan, x in (('', r), (', mixed plan', r.get('mixed') or {})):
            if x.get('status', 'exact') in ('exact', 'skipped'):
                continue
            err = x.get('error', '')
            if x.get('first_divergence'):
                err += f'first differs at {x["first_divergence"]}'
            where = x.get('cpd_where') or x.get('where') or ''
            stage = f' in {x["stage"]}' if x.get('stage') else ''
            lines.append(f'- **{key}** ({x["status"]}{stage}{plan}): '
                         f'{err.replace("|", "/")}' +
                         (f' — at `{where}`' if where else ''))
    f64 = sorted(k for k, r in results.items() if r.get('float64_error'))
    if f64:
        lines.append('')
        lines.append(f'Float64 breaks after surgery (checked in float32 '
                     f'instead): {", ".join(f64)}: '
                     f'{results[f64[0]]["float64_error"]}')
    unhandled = Counter()
    for r in results.values():
        unhandled.update(r.get('unhandled_ops', {}).keys())
    if unhandled:
        lines.append('')
        lines.append('Unhandled aten ops (number of models): ' + ', '.join(
            f'`{op}` ({c})' for op, c in unhandled.most_common()))
    return lines


def write_markdown(cache, path):
    results = cache.get('results', {})
    meta = cache.get('meta', {})
    commits = sorted({r.get('commit', '?') for r in results.values()})
    out = ['# Zoo coverage: is pruning exact on every model family?', '',
           'Written by `benchmarks/zoo_coverage.py` (see its docstring for '
           'the command lines). One config per model family of MMPretrain '
           '1.2.0 and MMSegmentation 1.2.2 (smallest variant) and one model '
           "per torchvision family, random weights. Each model is combed on "
           'its example input, a random '
           f'{int(100 * meta.get("ratio", 0.5))}% of every prunable group is '
           'removed (`tools/check_pruning.py`\'s plan), and the gated model '
           'is compared with the physically pruned one: float64 with '
           'relative tolerance 1e-6, or float32 / 1e-4 where marked [fp32]. '
           '"FLOPs kept" is the ratio at that plan (cpd_mm\'s cost model, '
           'auxiliary heads included / mmengine\'s counter on the tensor '
           'path). "frozen" is the share of channels comb froze. '
           f'cpd_mm commit(s): {", ".join(commits)}. "mixed plan": a second '
           'plan where every group loses its own random share (10-90%), which '
           'shows rules that hold only when coupled groups shrink alike. The '
           'constructs behind the failures, with repros, are in '
           '[zoo_failures.md](zoo_failures.md).', '', '## Summary', '']
    out += summary(results)
    out += ['', '## Models', '']
    out += table(results)
    out += ['', '## Failures', '']
    out += failures(results) or ['none']
    with open(path, 'w') as f:
        f.write('\n'.join(out) + '\n')
