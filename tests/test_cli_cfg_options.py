"""--cfg-options keys that are constructor arguments of the built class.

A new last key is accepted when the class that the addressed dict builds
(its ``type``, looked up in mmengine's registries in the config's scope)
takes it; a key close to an argument or a sibling is still a misspelling.
"""
import os.path as osp

import pytest
from mmengine.config import Config

from cpd_mm.utils.cli import CLIError, load_config, merge_cfg_options

PRUNE_CFG = 'configs/cpd/resnet50_prune.py'


@pytest.fixture(scope='module')
def prune_cfg(repo_root):
    return load_config(osp.join(repo_root, PRUNE_CFG))


@pytest.fixture
def cfg(prune_cfg):
    return prune_cfg.copy()


@pytest.mark.parametrize('key,value', [
    # close to num_stages, but an argument of mmpretrain's ResNet
    ('model.student.backbone.frozen_stages', 1),
    ('model.student.backbone.norm_eval', True),
    # an argument of CPDPruningHook (root HOOKS), not in the config yet
    ('custom_hooks.0.save_at', [0.25]),
    # an argument of CPDDistiller, registered by cpd_mm
    ('model.init_cfg', dict(type='Pretrained', checkpoint='a.pth')),
])
def test_constructor_argument_is_accepted(cfg, key, value):
    merge_cfg_options(cfg, {key: value})
    node = cfg
    for part in key.split('.'):
        node = node[int(part)] if part.isdigit() else node[part]
    assert node == value


@pytest.mark.parametrize('key,expect', [
    ('model.student.backbone.frozen_stagse', 'did you mean frozen_stages'),
    ('model.student.backbone.num_stagse', 'did you mean num_stages'),
    ('custom_hooks.0.memory_nrom', 'did you mean memory_norm'),
    ('custom_hooks.0.target_sparsty', 'did you mean target_sparsity'),
])
def test_misspelt_argument_is_refused(cfg, key, expect):
    before = cfg.pretty_text
    with pytest.raises(CLIError) as info:
        merge_cfg_options(cfg, {key: 1})
    assert f'"{key}"' in str(info.value) and expect in str(info.value)
    assert cfg.pretty_text == before


def test_scope_and_mro():
    """Scoped type names (mmengine writes them ``scope.Type``), the
    config's default scope, and arguments passed up through **kwargs."""
    cfg = Config(dict(
        model=dict(type='mmpretrain.ResNet', depth=18, num_stages=4),
        other=dict(type='ResNetV1d', depth=18, num_stages=4)))
    merge_cfg_options(cfg, {'model.frozen_stages': 1})
    assert cfg.model.frozen_stages == 1
    cfg.default_scope = 'mmpretrain'
    # ResNetV1d(**kwargs) passes them to ResNet; 'other' has no registry
    with pytest.raises(CLIError, match='did you mean num_stages'):
        merge_cfg_options(cfg, {'other.frozen_stages': 1})
    cfg.model.update(type='ResNetV1d')
    merge_cfg_options(cfg, {'model.frozen_stages': 2, 'model.deep_stem': 1})
    with pytest.raises(CLIError, match='did you mean frozen_stages'):
        merge_cfg_options(cfg, {'model.frozen_stage': 1})


def test_unknown_type_keeps_the_sibling_rule():
    cfg = Config(dict(model=dict(type='NoSuchNet', num_stages=4)))
    with pytest.raises(CLIError, match='did you mean num_stages'):
        merge_cfg_options(cfg, {'model.frozen_stages': 1})
    merge_cfg_options(cfg, {'model.width': 3})  # nothing close: new key
    assert cfg.model.width == 3


def test_train_tool_accepts_frozen_stages(repo_root, capsys, monkeypatch,
                                          tmp_path):
    """Through tools/train.py: the key passes, the run stops at the data."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'cpd_tools_train_opts', osp.join(repo_root, 'tools', 'train.py'))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.chdir(repo_root)
    monkeypatch.delenv('CPD_MM_TRACEBACK', raising=False)
    missing = tmp_path / 'no_data'
    argv = [PRUNE_CFG, '--work-dir', str(tmp_path), '--cfg-options',
            'model.student.backbone.frozen_stages=1',
            f'train_dataloader.dataset.data_root={missing}']
    with pytest.raises(SystemExit):
        train.run_cli(lambda: train.main(argv))
    err = capsys.readouterr().err
    assert err == (f'error: train_dataloader.dataset.data_root "{missing}" '
                   'does not exist\n')
    argv[4] = 'model.student.backbone.frozen_stagse=1'
    with pytest.raises(SystemExit):
        train.run_cli(lambda: train.main(argv))
    assert 'did you mean frozen_stages or' in capsys.readouterr().err
