"""tools/run_demo.py's plot: accuracy against measured latency, the
reference marked (the rows as main() writes them to summary.json)."""
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
import run_demo  # noqa: E402


def test_plot_marks_the_reference(tmp_path):
    rows = [dict(name='baseline', model='baseline (12 epochs)', top1=74.6,
                 onnx_median_ms=1.08),
            dict(name='reference', model='reference: unpruned, +8 epochs',
                 top1=81.2, onnx_median_ms=1.08),
            dict(name='cpd', model='CPD: latency 50%, hessian + KL',
                 top1=78.6, onnx_median_ms=0.51)]
    path = tmp_path / 'accuracy_vs_latency.png'
    run_demo.plot(rows, str(path))
    assert path.stat().st_size > 10000
