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
    assert '--repeats must be at least 1' in capsys.readouterr().err
    assert not (tmp_path / 'demo').exists()
