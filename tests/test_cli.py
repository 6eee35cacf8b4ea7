"""--cfg-options validation and the shared CLI helpers (cpd_mm.utils.cli)."""
import pytest
from mmengine.config import Config
from mmengine.device import get_device

from cpd_mm.utils.cli import (CLIError, check_cfg_options, check_launcher,
                              load_config, merge_cfg_options)


@pytest.fixture
def cfg():
    return Config(dict(
        train_cfg=dict(max_epochs=2, val_interval=1),
        model=dict(backbone=dict(depth=18)),
        custom_hooks=[dict(type='A', interval=1)],
        val_cfg=None))


@pytest.mark.parametrize('options', [
    {'train_cfg.max_epochs': 3},
    {'custom_hooks.0.interval': 5},           # list item by index
    {'train_dataloader': 4},                  # new top-level key
    {'model.backbone.frozen_stages': 1},      # new leaf, nothing close
])
def test_valid_keys_merge(cfg, options):
    merge_cfg_options(cfg, options)
    for key, value in options.items():
        node = cfg
        for part in key.split('.'):
            node = node[int(part)] if part.isdigit() else node[part]
        assert node == value


@pytest.mark.parametrize('key,message', [
    ('train_cfg.max_eopchs', 'did you mean max_epochs'),
    ('trian_cfg.max_epochs', 'did you mean train_cfg'),
    ('model.backbne.depth', 'did you mean backbone'),
    ('model.neck.in_channels', 'its keys are: backbone'),
    ('custom_hooks.1.interval', 'its keys are: 0'),
    ('val_cfg.type', '"val_cfg" is None, not a dict or list'),
])
def test_wrong_keys_are_rejected(cfg, key, message):
    before = cfg.pretty_text
    with pytest.raises(CLIError) as info:
        merge_cfg_options(cfg, {key: 1})
    assert f'"{key}"' in str(info.value) and message in str(info.value)
    assert cfg.pretty_text == before  # nothing merged


def test_all_keys_checked_before_any_merge(cfg):
    with pytest.raises(CLIError, match='max_eopchs'):
        merge_cfg_options(cfg, {'train_cfg.max_epochs': 5,
                                'train_cfg.max_eopchs': 3})
    assert cfg.train_cfg.max_epochs == 2
    check_cfg_options(cfg, None)  # no options: nothing to check


def test_load_config_errors(tmp_path):
    with pytest.raises(CLIError, match='does not exist; did you mean'):
        (tmp_path / 'my_config.py').write_text('a = 1\n')
        load_config(str(tmp_path / 'my_confg.py'))
    bad = tmp_path / 'broken.py'
    bad.write_text('a = (\n')
    with pytest.raises(CLIError, match='cannot read config'):
        load_config(str(bad))
    assert load_config(str(tmp_path / 'my_config.py')).a == 1


@pytest.mark.skipif(get_device() != 'cpu', reason='only fails without GPUs')
def test_launcher_without_gpu_is_a_clear_error():
    with pytest.raises(CLIError, match='--launcher pytorch needs GPUs'):
        check_launcher('pytorch')
    check_launcher('none')
