"""tools/run_demo.py's plot: accuracy against measured latency, the
reference marked (the rows as main() writes them to summary.json)."""
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import run_demo  # noqa: E402


def test_plot_marks_the_reference(tmp_path):
    rows = [dict(name='baseline', model='baseline (30 epochs)', top1=87.4,
                 onnx_median_ms=0.37),
            dict(name='reference', model='reference: unpruned, +16 epochs',
                 top1=88.0, onnx_median_ms=0.37),
            dict(name='cpd', model='CPD: latency 50%, hessian + KL',
                 top1=88.6, onnx_median_ms=0.18)]
    path = tmp_path / 'accuracy_vs_latency.png'
    run_demo.plot(rows, str(path))
    assert path.stat().st_size > 10000
    # the INT8 row is a fourth marker
    rows.append(dict(name='cpd_int8', model='CPD ... + INT8', top1=88.1,
                     onnx_median_ms=0.07))
    labels = run_demo.plot(rows, str(tmp_path / 'with_int8.png'))
    assert labels == [r['model'] for r in rows] + ['reference - 1 point']


def compare(speedup, int8_ms):
    """What export_onnx.py --int8 --compare-to writes under 'compare'."""
    bench = dict(median_ms=int8_ms)
    return dict(speedup_median=speedup,
                original=dict(params=7e5, flops=3.5e7,
                              benchmark=dict(median_ms=int8_ms * speedup)),
                pruned=dict(params=3e5, flops=1.5e7, benchmark=bench))


def test_int8_row_takes_the_median_timing():
    timings = [compare(5.0, 0.08), compare(3.0, 0.12), compare(4.0, 0.1)]
    cmp = run_demo.median_compare(timings)
    assert cmp['speedup_median'] == 4.0
    row = run_demo.int8_row('CPD: latency 50%, hessian + KL', 16, cmp, 87.9)
    assert row['name'] == 'cpd_int8' and row['precision'] == 'int8'
    assert row['speedup'] == 4.0 and row['onnx_median_ms'] == 0.1
    assert row['top1'] == 87.9 and row['params'] == 3e5
    assert 'INT8' in row['model'] and '+16 epochs' in row['model']


def test_rows_read_the_shipped_configs():
    """The table's labels and checkpoint names come from the configs, so
    editing the schedule or the target cannot leave them stale."""
    cfg = run_demo.load_config(run_demo.PRUNE_CFG)
    hook = [h for h in cfg.custom_hooks if h['type'] == 'CPDPruningHook'][0]
    label = run_demo.cpd_label(cfg)
    assert label.startswith(f"CPD: {hook['target']} ")
    assert f"{hook['target_sparsity']:.0%}" in label
    assert hook['importance'] in label
    base = run_demo.load_config(run_demo.BASE_CFG)
    # the prune config starts from the baseline's last checkpoint
    assert cfg.load_from.endswith(f'epoch_{base.train_cfg.max_epochs}.pth')


def test_bad_repeats_stop_before_any_work(monkeypatch, tmp_path, capsys):
    import pytest
    monkeypatch.setattr(sys, 'argv', ['run_demo.py', '--repeats', '0',
                                      '--work-dir', str(tmp_path / 'demo')])
    with pytest.raises(SystemExit):
        run_demo.main()
    assert 'must be at least 1, got 1000, 0 and 256' in \
        capsys.readouterr().err
    assert not (tmp_path / 'demo').exists()
