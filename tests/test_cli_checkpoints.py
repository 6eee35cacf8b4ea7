"""Checkpoints and data in tools/train.py and tools/test.py.

* a missing checkpoint or data root is one line, before the runner exists;
* a model-zoo URL that cannot be downloaded (this machine is offline; the
  download is replaced by a failing one) says which file to put where;
* pruned checkpoints (plan in meta, or a pruning run's gated checkpoint)
  load into the model built from the original config (CPDRunner) for
  training, resuming and testing, without init_weights overwriting them.
"""
import copy
import importlib.util
import os.path as osp
import urllib.error

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import _load_checkpoint, save_checkpoint

from cpd_mm.utils.checkpoint import CheckpointLoadError, url_cache_path
from cpd_mm.utils.cli import CLIError, check_data_paths, runner_class
from equivalence import random_kept

CLS_CFG = 'configs/demo/resnet18_demo-cls.py'
KD_CFG = 'configs/demo/resnet18_demo-cls_kd.py'
URL = ('https://download.openmmlab.com/mmclassification/v0/resnet/'
       'resnet50_8xb32_in1k_20210831-ea4938fc.pth')


def _tool(repo_root, name):
    spec = importlib.util.spec_from_file_location(
        f'cpd_tools_{name}_ckpt', osp.join(repo_root, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def train(repo_root):
    return _tool(repo_root, 'train')


@pytest.fixture(scope='module')
def test(repo_root):
    return _tool(repo_root, 'test')


@pytest.fixture
def run(repo_root, monkeypatch, capsys):
    """``run(tool, argv)``: main's result; ``run(..., fails=True)``: the
    one-line stderr of the error (checked: exit 1, no runner was built)."""
    monkeypatch.chdir(repo_root)
    monkeypatch.delenv('CPD_MM_TRACEBACK', raising=False)

    def call(tool, argv, fails=False):
        argv = [str(a) for a in argv]
        if not fails:
            return tool.main(argv)
        with pytest.raises(SystemExit) as info:
            tool.run_cli(lambda: tool.main(argv))
        assert info.value.code == 1
        out, err = capsys.readouterr()
        assert err.startswith('error: ') and err.count('\n') == 1, err
        assert 'Hooks will be executed' not in out + err  # no runner
        return err

    return call


def _data(root, loaders=('train', 'val', 'test')):
    opts = ['default_hooks.logger.interval=1']
    for loader in loaders:
        opts += [f'{loader}_dataloader.dataset.data_root={root}',
                 f'{loader}_dataloader.num_workers=0',
                 f'{loader}_dataloader.persistent_workers=False']
    return opts


# ---------------------------------------------- missing files, before runner


def test_missing_load_from_and_data(train, test, run, tmp_path,
                                    tiny_cls_data):
    missing = tmp_path / 'missing.pth'
    err = run(train, [CLS_CFG, '--work-dir', tmp_path, '--cfg-options',
                      f'load_from={missing}'], fails=True)
    assert err == f'error: load_from "{missing}" does not exist\n'
    err = run(train, [CLS_CFG, '--work-dir', tmp_path, '--cfg-options',
                      *_data(tmp_path / 'nope')], fails=True)
    assert err == (f'error: train_dataloader.dataset.data_root '
                   f'"{tmp_path / "nope"}" does not exist\n')
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    err = run(test, [CLS_CFG, ckpt, '--cfg-options',
                     f'test_dataloader.dataset.data_root={tiny_cls_data}',
                     'test_dataloader.dataset.data_prefix=nope'], fails=True)
    assert err == (f'error: test_dataloader.dataset.data_prefix '
                   f'"{osp.join(tiny_cls_data, "nope")}" does not exist\n')


def test_demo_data_hint(train, run, tmp_path):
    err = run(train, [CLS_CFG, '--work-dir', tmp_path, '--cfg-options',
                      *_data('data/demo/none', ['train'])], fails=True)
    assert 'python tools/make_demo_data.py' in err


def test_check_data_paths_rules(tmp_path):
    (tmp_path / 'meta').mkdir()
    (tmp_path / 'meta' / 'train.txt').write_text('')
    ok = dict(data_root=str(tmp_path), ann_file='meta/train.txt',
              data_prefix=dict(img_path=''))
    cfg = Config(dict(
        train_dataloader=dict(dataset=dict(
            type='RepeatDataset', times=2,
            dataset=dict(type='ConcatDataset', datasets=[
                ok, dict(ok, ann_file='meta/val.txt')]))),
        val_dataloader=dict(dataset=dict(data_root='s3://bucket/data')),
        test_dataloader=None))
    with pytest.raises(CLIError) as info:
        check_data_paths(cfg, ['train_dataloader'])
    assert str(info.value) == (
        'train_dataloader.dataset.dataset.datasets.1.ann_file '
        f'"{tmp_path / "meta" / "val.txt"}" does not exist')
    # remote roots, absent and None loaders are not checked
    check_data_paths(cfg, ['val_dataloader', 'test_dataloader', 'nothing'])


# --------------------------------------------------- model-zoo downloads


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: the download fails as urllib does; torch.hub's cache is
    in tmp_path. Returns the list of URLs that were attempted."""
    attempts = []

    def fail(url, dst, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError('[Errno -3] Temporary failure in name '
                                    'resolution')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fail)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return attempts


def test_config_points_at_the_model_zoo(repo_root):
    cfg = Config.fromfile(osp.join(repo_root, 'configs/cpd/resnet50_prune.py'))
    assert cfg.load_from == URL


def test_failed_download_says_where_to_put_the_file(
        train, run, offline, tmp_path, repo_root):
    """The real prune config, its real URL, data roots that exist."""
    cache = str(tmp_path / 'torch' / 'hub' / 'checkpoints' /
                osp.basename(URL))
    assert url_cache_path(URL) == cache
    data = tmp_path / 'imagenet'
    opts = []
    for split, loader in (('train', 'train'), ('val', 'val')):
        (data / split).mkdir(parents=True)
        (data / 'meta').mkdir(exist_ok=True)
        (data / 'meta' / f'{split}.txt').write_text('')
        opts.append(f'{loader}_dataloader.dataset.data_root={data}')
    err = run(train, ['configs/cpd/resnet50_prune.py', '--work-dir',
                      tmp_path, '--cfg-options', *opts], fails=True)
    assert offline == [URL]
    assert err.startswith(f'error: cannot load checkpoint "{URL}": the '
                          'download failed (URLError: ')
    assert f'put it at {cache} (mmengine loads it from there)' in err
    assert 'set load_from' in err


def test_cached_file_is_used_without_network(offline, tmp_path):
    path = url_cache_path(URL)
    with pytest.raises(CheckpointLoadError, match='download failed'):
        _load_checkpoint(URL)
    torch.save({'state_dict': {'w': torch.ones(2)}}, path)
    assert torch.equal(_load_checkpoint(URL)['state_dict']['w'],
                       torch.ones(2))
    assert len(offline) == 1  # the second load found the file
    with open(path, 'wb') as f:
        f.write(b'junk')
    with pytest.raises(CheckpointLoadError, match='delete it'):
        _load_checkpoint(URL)


def test_test_tool_url_checkpoint_offline(test, run, offline, tmp_path,
                                          tiny_cls_data):
    url = 'https://example.com/models/demo.pth'
    err = run(test, [CLS_CFG, url, '--work-dir', tmp_path, '--cfg-options',
                     *_data(tiny_cls_data, ['test'])], fails=True)
    assert f'put it at {url_cache_path(url)}' in err


# ------------------------------------------------------ pruned checkpoints


@HOOKS.register_module(force=True)
class _KeepStartWeights(Hook):
    """Records the model's weights when training starts."""

    def before_train(self, runner):
        runner.start_state = copy.deepcopy(runner.model.state_dict())


def _prune_half(model):
    from cpd_mm.comb import comb_model
    from cpd_mm.prune import make_plan
    comb = comb_model(model, input_shape=(1, 3, 32, 32))
    kept = random_kept(comb, 0.5, np.random.default_rng(0))
    return comb, kept, make_plan(comb, kept, model)


@pytest.fixture(scope='module')
def checkpoints(repo_root, tmp_path_factory):
    """A pruned checkpoint (plan in meta) and a gated one (full weights,
    plan in 'cpd_pruning'), with the state dicts they stand for."""
    from cpd_mm.apis import init_model
    from cpd_mm.prune import prune_model
    tmp = tmp_path_factory.mktemp('ckpts')
    torch.manual_seed(0)
    model = init_model(osp.join(repo_root, CLS_CFG), device='cpu')
    comb, kept, plan = _prune_half(model)
    small = prune_model(copy.deepcopy(model), comb, kept)
    pruned, gated = str(tmp / 'pruned.pth'), str(tmp / 'gated.pth')
    save_checkpoint({'state_dict': small.state_dict(),
                     'meta': {'cpd_plan': plan}}, pruned)
    save_checkpoint({'state_dict': model.state_dict(), 'meta': {},
                     'cpd_pruning': {'plan': plan}}, gated)
    return dict(pruned=pruned, gated=gated, plan=plan,
                state=small.state_dict())


def _child(tmp_path, repo_root, base):
    path = tmp_path / 'child.py'
    path.write_text(f"_base_ = ['{osp.join(repo_root, base)}']\n"
                    f"experiment_name = '{tmp_path.name}'\n"
                    "custom_hooks = [dict(type='_KeepStartWeights')]\n")
    return path


@pytest.mark.parametrize('kind', ['pruned', 'gated'])
def test_finetune_starts_from_the_pruned_weights(
        train, run, checkpoints, tmp_path, repo_root, tiny_cls_data, kind):
    runner = run(train, [
        _child(tmp_path, repo_root, CLS_CFG), '--work-dir', tmp_path,
        '--no-validate', '--cfg-options', 'train_cfg.max_epochs=1',
        'train_dataloader.batch_size=12', f'load_from={checkpoints[kind]}',
        *_data(tiny_cls_data, ['train'])])
    assert type(runner).__name__ == 'CPDRunner'
    expected = checkpoints['state']
    assert runner.start_state.keys() == expected.keys()
    for key, value in expected.items():  # not re-initialised
        assert torch.equal(runner.start_state[key], value), key
    saved = torch.load(tmp_path / 'epoch_1.pth', weights_only=False)
    assert saved['meta']['cpd_plan'] == checkpoints['plan']


def test_distiller_resume_and_test(train, test, run, checkpoints, tmp_path,
                                   repo_root, tiny_cls_data):
    """KD config: student and 'self' teacher pruned; resume and test.py
    work on the fine-tuned checkpoints with the original configs."""
    args = [_child(tmp_path, repo_root, KD_CFG), '--work-dir', tmp_path,
            '--no-validate', '--cfg-options', 'train_dataloader.batch_size=12',
            f'load_from={checkpoints["pruned"]}',
            *_data(tiny_cls_data, ['train'])]
    runner = run(train, args + ['train_cfg.max_epochs=1'])
    model = runner.model
    for key, value in checkpoints['state'].items():
        assert torch.equal(runner.start_state['student.' + key], value)
        assert torch.equal(runner.start_state['teacher.' + key], value)
    runner = run(train, args + ['train_cfg.max_epochs=2', '--resume'])
    assert runner.epoch == 2 and runner.model is not model
    metrics = run(test, [CLS_CFG, tmp_path / 'epoch_2.pth', '--work-dir',
                         tmp_path, '--cfg-options',
                         *_data(tiny_cls_data, ['test'])])
    assert 'accuracy/top1' in metrics


def test_runner_class():
    """CPDRunner by default; a Runner subclass is combined with it."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import FlexibleRunner, Runner

    from cpd_mm.prune import CPDRunner

    @RUNNERS.register_module(force=True)
    class MyRunner(Runner):
        pass

    assert runner_class(Config(dict())) is CPDRunner
    assert runner_class(Config(dict(runner_type='Runner'))) is CPDRunner
    combined = runner_class(Config(dict(runner_type='MyRunner')))
    assert combined.__mro__[1:4] == (CPDRunner, MyRunner, Runner)
    flexible = Config(dict(runner_type='FlexibleRunner'))
    assert runner_class(flexible) is FlexibleRunner
    with pytest.raises(CLIError, match='"NoRunner" is not registered'):
        runner_class(Config(dict(runner_type='NoRunner')))
