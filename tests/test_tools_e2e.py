"""tools/train.py and tools/test.py end to end, for both codebases.

Training and testing run as subprocesses on tiny generated data sets, with
``--cfg-options`` shrinking the demo configs; user errors are checked for a
one-line message and a non-zero exit (in-process where a subprocess would
only add start-up time).
"""
import importlib.util
import os.path as osp
import pickle

import pytest

CLS_CFG = 'configs/demo/resnet18_demo-cls.py'
SEG_CFG = 'configs/demo/pspnet_r18_demo-seg.py'


def _shrink(data_root, max_epochs, batch_size):
    """--cfg-options pointing a demo config at ``data_root``, shrunk."""
    opts = [f'train_cfg.max_epochs={max_epochs}',
            f'train_dataloader.batch_size={batch_size}',
            'default_hooks.logger.interval=1']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.dataset.data_root={data_root}',
                 f'{loader}.num_workers=0',
                 f'{loader}.persistent_workers=False']
    return ['--cfg-options', *opts]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def cls_work_dir(tmp_path_factory, run_tool, tiny_cls_data):
    work_dir = tmp_path_factory.mktemp('cls_run')
    _ok(run_tool('train.py', CLS_CFG, '--work-dir', work_dir,
                 *_shrink(tiny_cls_data, 1, 8)))
    return work_dir


def test_cls_train_writes_checkpoint(cls_work_dir):
    assert osp.isfile(cls_work_dir / 'epoch_1.pth')
    assert open(cls_work_dir / 'last_checkpoint').read().strip().endswith(
        'epoch_1.pth')


def test_cls_resume_then_test(cls_work_dir, run_tool, tiny_cls_data,
                              tmp_path):
    # --resume without a value finds epoch_1.pth in the work dir (auto);
    # loading it needs cpd_mm's safe globals (message hub, numpy values).
    log = _ok(run_tool('train.py', CLS_CFG, '--work-dir', cls_work_dir,
                       *_shrink(tiny_cls_data, 2, 8), '--resume'))
    assert 'resumed epoch: 1' in log
    ckpt = cls_work_dir / 'epoch_2.pth'
    assert osp.isfile(ckpt)
    out = tmp_path / 'preds.pkl'
    log = _ok(run_tool('test.py', CLS_CFG, ckpt, '--work-dir', tmp_path,
                       '--out', out, *_shrink(tiny_cls_data, 1, 8)))
    assert 'accuracy/top1' in log
    preds = pickle.load(open(out, 'rb'))
    assert len(preds) == 12  # every validation image


def test_seg_train_and_test(tmp_path, run_tool, tiny_seg_data):
    # Two epochs: epoch_2.pth then holds epoch 1's mIoU (numpy float32).
    _ok(run_tool('train.py', SEG_CFG, '--work-dir', tmp_path,
                 *_shrink(tiny_seg_data, 2, 4)))
    ckpt = tmp_path / 'epoch_2.pth'
    assert osp.isfile(ckpt)
    log = _ok(run_tool('test.py', SEG_CFG, ckpt, '--work-dir',
                       tmp_path / 'test', *_shrink(tiny_seg_data, 1, 4)))
    assert 'mIoU' in log


def test_wrong_config_path_subprocess(run_tool):
    proc = run_tool('train.py', 'configs/demo/no_such_config.py')
    assert proc.returncode == 1
    assert 'config file "configs/demo/no_such_config.py" does not exist' \
        in proc.stderr
    assert 'Traceback' not in proc.stderr


# In-process error cases --------------------------------------------------


def _load_tool(repo_root, name):
    spec = importlib.util.spec_from_file_location(
        f'cpd_tools_{name}', osp.join(repo_root, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(tool, argv, capsys, monkeypatch, repo_root):
    """Run a tool's main like its __main__ does; return stderr of the error."""
    monkeypatch.chdir(repo_root)
    monkeypatch.delenv('CPD_MM_TRACEBACK', raising=False)
    with pytest.raises(SystemExit) as info:
        tool.run_cli(lambda: tool.main([str(a) for a in argv]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err
    return err


def _child_config(tmp_path, repo_root, base, extra=''):
    """A config in ``tmp_path`` inheriting ``base``, plus ``extra`` lines.

    Runners built in-process within the same second would share one logger
    (named after the experiment and a timestamp) whose stream is a previous
    test's closed capture: a unique experiment name avoids that.
    """
    path = tmp_path / 'child.py'
    path.write_text(f"_base_ = ['{osp.join(repo_root, base)}']\n"
                    f"experiment_name = '{tmp_path.name}'\n{extra}\n")
    return path


@pytest.fixture(scope='module')
def train_tool(repo_root):
    return _load_tool(repo_root, 'train')


@pytest.fixture(scope='module')
def test_tool(repo_root):
    return _load_tool(repo_root, 'test')


@pytest.mark.parametrize('key,expect', [
    ('train_cfg.max_eopchs=3', 'did you mean max_epochs'),
    ('trian_cfg.max_epochs=3', 'did you mean train_cfg'),
    ('model.backbone.deph.x=1', 'did you mean depth'),
])
def test_misspelt_cfg_option(train_tool, capsys, monkeypatch, repo_root,
                             key, expect):
    err = _fails(train_tool, [CLS_CFG, '--cfg-options', key], capsys,
                 monkeypatch, repo_root)
    assert f'"{key.split("=")[0]}"' in err and expect in err


def test_missing_checkpoint(train_tool, test_tool, capsys, monkeypatch,
                            repo_root, tmp_path):
    missing = tmp_path / 'missing.pth'
    err = _fails(test_tool, [SEG_CFG, missing], capsys, monkeypatch,
                 repo_root)
    assert f'checkpoint "{missing}" does not exist' in err
    err = _fails(train_tool, [CLS_CFG, '--resume', missing], capsys,
                 monkeypatch, repo_root)
    assert f'checkpoint to resume "{missing}" does not exist' in err


def test_corrupt_checkpoint(test_tool, capsys, monkeypatch, repo_root,
                            tmp_path, tiny_cls_data):
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'\x00' * 100)
    cfg = _child_config(tmp_path, repo_root, CLS_CFG)
    err = _fails(test_tool, [cfg, bad, '--work-dir', tmp_path,
                             *_shrink(tiny_cls_data, 1, 8)],
                 capsys, monkeypatch, repo_root)
    assert 'corrupt.pth' in err and 'corrupt' in err


@pytest.mark.parametrize('hook,expect', [
    ("dict(type='CPDPruningHook', target_sparsity=1.5)", 'target_sparsity'),
    ("dict(type='EMAHook', begin_iter=-1)", 'begin_iter'),
])
def test_hook_argument_error(train_tool, capsys, monkeypatch, repo_root,
                             tmp_path, hook, expect):
    cfg = _child_config(tmp_path, repo_root, CLS_CFG,
                        f'custom_hooks = [{hook}]')
    err = _fails(train_tool, [cfg, '--work-dir', tmp_path], capsys,
                 monkeypatch, repo_root)
    assert 'cannot build the runner' in err and expect in err
