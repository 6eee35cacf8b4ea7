"""Human-readable reports of groups and kept channels (tables, bar chart)."""
from typing import Optional

import numpy as np

from ..comb.groups import CombResult


def _short(names, n=2):
    names = list(names)
    s = ', '.join(names[:n])
    return s + (f' (+{len(names) - n})' if len(names) > n else '')


def group_table(comb: CombResult, kept: Optional[np.ndarray] = None,
                max_rows: Optional[int] = None) -> str:
    """One row per group: size, kept, granularity, members, frozen reasons."""
    from prettytable import PrettyTable
    t = PrettyTable(['#', 'group', 'size', 'kept', 'granularity', 'producers',
                     'consumers', 'passengers', 'frozen'])
    t.align = 'l'
    for i, g in enumerate(comb.groups):
        if max_rows is not None and i >= max_rows:
            break
        k = int(kept[g.channels].sum()) if kept is not None else g.size
        frozen = f'{int(g.frozen.sum())}'
        if g.reasons:
            frozen += ': ' + _short(g.reasons, 1)
        t.add_row([i, g.name, g.size, k, g.granularity, _short(g.producers),
                   _short(g.consumers), _short(g.passengers), frozen])
    return t.get_string()


def summary_table(comb: CombResult, kept: np.ndarray) -> str:
    from prettytable import PrettyTable
    t = PrettyTable(['group', 'channels', 'kept', 'kept %'])
    t.align = 'l'
    for g in comb.groups:
        if not g.prunable:
            continue
        k = int(kept[g.channels].sum())
        t.add_row([g.name, g.size, k, f'{100.0 * k / g.size:.1f}'])
    return t.get_string()


def save_kept_chart(comb: CombResult, kept: np.ndarray, path: str) -> str:
    """Bar chart of kept channels per prunable group (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    groups = [g for g in comb.groups if g.prunable]
    sizes = np.array([g.size for g in groups])
    keeps = np.array([int(kept[g.channels].sum()) for g in groups])
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(groups)), 4))
    x = np.arange(len(groups))
    ax.bar(x, sizes, color='#cccccc', label='original')
    ax.bar(x, keeps, color='#1f77b4', label='kept')
    ax.set_xticks(x)
    ax.set_xticklabels([g.name for g in groups], rotation=90, fontsize=6)
    ax.set_ylabel('channels')
    ax.set_title('CPD: kept channels per group')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
