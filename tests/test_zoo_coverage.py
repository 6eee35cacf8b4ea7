"""Zoo coverage, CI subset: gated and pruned models agree on real models.

Runs ``benchmarks/zoo_coverage.py --subset ci`` through its own functions
(in this process, so a failure shows its traceback): every model is built
with random weights, combed, half of every prunable group is removed at
random, and the gated and physically pruned outputs must match (float64,
relative 1e-6; float32 / 1e-4 where the model needs it), also for a plan
that removes a different share of every group. Models that fail on today's
code are marked xfail with the construct that breaks them (non-strict):
when a fix lands they pass (XPASS) and the mark can go.
"""
import os.path as osp
import sys

import pytest

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'benchmarks'))

import zoo_coverage  # noqa: E402
from zoo_check import check_model  # noqa: E402

# key -> the construct that breaks it today (none: every model of the
# subset prunes exactly; add an entry here, with the construct, when one
# does not, so the table says why)
KNOWN_FAILURES = {}

CI_ENTRIES = zoo_coverage.select(zoo_coverage.parse_args(['--subset', 'ci']))


def _param(entry):
    reason = KNOWN_FAILURES.get(entry.key)
    marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
    return pytest.param(entry, id=entry.key, marks=marks)


def test_ci_subset_is_selected():
    keys = [e.key for e in CI_ENTRIES]
    assert len(keys) >= 6 and len(set(keys)) == len(keys), keys
    assert set(KNOWN_FAILURES) <= set(keys)


@pytest.mark.parametrize('entry', [_param(e) for e in CI_ENTRIES])
def test_zoo_model_prunes_exactly(entry):
    res = check_model(entry, mmengine_flops=False, log=lambda *a: None)
    where = res.get('cpd_where') or res.get('where') or ''
    assert res['status'] == 'exact', (
        f'{entry.key}: {res["status"]}: '
        f'{res.get("error") or res.get("max_rel_diff")} {where}')
    # a plan with a different share per group: rules that hold only when
    # coupled groups shrink alike fail here
    mixed = res['mixed']
    assert mixed['status'] == 'exact', (
        f'{entry.key}, mixed plan: {mixed["status"]}: '
        f'{mixed.get("error") or mixed.get("first_divergence")}')
    # not vacuous: channels were removed and the model really shrank, and
    # the cost model the hook uses counted the pruned parameters exactly
    assert res['removed'] > 0
    assert res['params_pruned'] < res['params']
    assert res['cost_params_exact']
    assert 0 < res['flops_kept'] < 1


def test_runner_survives_a_hanging_model(tmp_path):
    """A model that does not finish becomes a 'timeout' row, not a crash."""
    args = zoo_coverage.parse_args(['--timeout', '0.5'])
    entry = next(e for e in CI_ENTRIES if e.codebase == 'torchvision')
    res = zoo_coverage.run_one(entry, args)
    assert res['status'] == 'timeout' and res['key'] == entry.key


def test_report_lists_every_status(tmp_path):
    from zoo_report import write_markdown
    base = dict(codebase='mmseg', model='m.py', frozen_reasons={
        'model output (in <model>)': 10, 'x.y reads channels on another '
        'axis': 7})
    cache = dict(meta=dict(ratio=0.5), results={
        'mmseg/a': dict(base, key='mmseg/a', family='a', status='exact',
                        flops_kept=0.7, frozen_share=0.1, groups=3,
                        prunable_groups=2, comb_s=1.0, input=64,
                        mixed=dict(status='differs', max_rel_diff=0.25,
                                   first_divergence='x.y (call 0)')),
        'mmseg/b': dict(base, key='mmseg/b', family='b', status='raises',
                        stage='surgery', error='RuntimeError: boom',
                        cpd_where='cpd_mm/prune/surgery.py:1 f')})
    path = tmp_path / 'zoo.md'
    write_markdown(cache, str(path))
    text = path.read_text()
    assert '| a: `m.py` | mmseg | 64 | exact | differs (2.5e-01) | 10% | 70% |' \
        in text
    assert 'x.y reads channels on another axis (7)' in text
    assert 'model output' not in text.split('## Models')[1]
    assert '**mmseg/b** (raises in surgery): RuntimeError: boom' in text
    assert '**mmseg/a** (differs, mixed plan): first differs at x.y' in text
    assert 'Exact but keeping > 60% of FLOPs: 1.' in text


def test_verify_is_passed_only_when_comb_model_accepts_it(monkeypatch):
    import cpd_mm.comb
    from zoo_check import comb_kwargs

    def old_comb(model, input_shape=(1, 3, 224, 224), example_inputs=None,
                 forward=None, exclude=()):
        pass

    def new_comb(model, input_shape=(1, 3, 224, 224), example_inputs=None,
                 forward=None, exclude=(), verify=True):
        pass

    monkeypatch.setattr(cpd_mm.comb, 'comb_model', old_comb)
    assert comb_kwargs(True) == ({}, None)
    monkeypatch.setattr(cpd_mm.comb, 'comb_model', new_comb)
    assert comb_kwargs(True) == ({'verify': True}, True)
    assert comb_kwargs(False) == ({'verify': False}, False)
    assert comb_kwargs(None) == ({}, True)  # comb_model's own default
