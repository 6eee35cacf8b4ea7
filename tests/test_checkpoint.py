"""Runner-written checkpoints load under weights_only=True, and only them.

A real mmengine Runner trains a toy model whose metric returns numpy values
and whose dataset metainfo holds numpy objects, which is what MMPretrain and
MMSegmentation runs put in ``message_hub`` and ``meta``.
"""
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

from cpd_mm.utils.checkpoint import CheckpointLoadError, load_from_local


class _ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, inputs, labels=None, mode='tensor'):
        x = self.bn(self.fc(torch.stack(inputs)))
        labels = torch.stack(labels)
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(x, labels))
        return list(zip(x.argmax(1), labels))


class _ToyData(Dataset):
    # numpy objects in metainfo end up in checkpoint['meta']['dataset_meta'].
    metainfo = dict(classes=('a', 'b'), palette=np.array([[1, 2, 3]]),
                    weight=np.float32(0.5))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(4, generator=g),
                    labels=torch.tensor(i % 2))


class _NumpyMetric(BaseMetric):
    """Returns numpy scalars of several dtypes, as real metrics do."""

    def process(self, data_batch, data_samples):
        self.results.extend(float(p == t) for p, t in data_samples)

    def compute_metrics(self, results):
        return dict(acc=np.float64(np.mean(results)), f32=np.float32(1),
                    count=np.int64(len(results)))


def _runner(work_dir, max_epochs, resume=False):
    loader = dict(dataset=_ToyData(), batch_size=4,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    return Runner(
        model=_ToyModel(), work_dir=str(work_dir),
        train_dataloader=loader, val_dataloader=loader,
        val_evaluator=[_NumpyMetric()],
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1]),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=1)),
        randomness=dict(seed=0), resume=resume,
        experiment_name=f'ckpt_{osp.basename(work_dir)}_{max_epochs}')


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    # Checkpoints are written before the epoch's validation: epoch 2 holds
    # the numpy metrics of epoch 1.
    _runner(work_dir, max_epochs=2).train()
    return work_dir, str(work_dir / 'epoch_2.pth')


def test_checkpoint_needs_the_allow_list(runner_ckpt):
    # Guards the premise: without cpd_mm's allow-list torch refuses the file.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(pickle.UnpicklingError,
                           match='not an allowed global'):
            torch.load(runner_ckpt[1], weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)
    torch.load(runner_ckpt[1], weights_only=True)  # allow-list is back


def test_load_checkpoint_into_model(runner_ckpt):
    model = _ToyModel()
    ckpt = load_checkpoint(model, runner_ckpt[1], map_location='cpu')
    acc = ckpt['message_hub']['log_scalars']['val/acc']
    assert isinstance(acc, HistoryBuffer) and len(acc.data[0]) == 1
    assert ckpt['meta']['dataset_meta']['weight'] == np.float32(0.5)
    saved = torch.load(runner_ckpt[1], weights_only=False)['state_dict']
    assert torch.equal(model.fc.weight, saved['fc.weight'])


def test_resume_continues_training(runner_ckpt):
    work_dir, _ = runner_ckpt
    runner = _runner(work_dir, max_epochs=3, resume=True)
    runner.train()
    assert runner.epoch == 3
    # The message hub came back from epoch_2.pth (val/acc of epoch 1), then
    # epoch 3 added its own: without the resumed hub there would be one.
    hist = runner.message_hub.get_scalar('val/acc')
    assert len(hist.data[0]) == 2
    assert osp.isfile(work_dir / 'epoch_3.pth')


def test_truncated_checkpoint_names_file(runner_ckpt, tmp_path):
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(open(runner_ckpt[1], 'rb').read()[:2000])
    with pytest.raises(CheckpointLoadError, match='truncated.pth'):
        load_checkpoint(_ToyModel(), str(bad))


def test_garbage_and_missing_file_name_file(tmp_path):
    bad = tmp_path / 'garbage.pth'
    bad.write_bytes(b'not a checkpoint' * 8)
    with pytest.raises(CheckpointLoadError, match='garbage.pth.*corrupt'):
        load_from_local(str(bad))
    with pytest.raises(CheckpointLoadError, match='missing.pth.*no such'):
        load_from_local(str(tmp_path / 'missing.pth'))


class _Arbitrary:
    """A class nobody allow-listed: weights_only must refuse it."""


class _Sneaky:
    """Pickles as getattr(HistoryBuffer, '__init__'): must be refused."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


@pytest.mark.parametrize('payload,reason', [
    (_Arbitrary(), '_Arbitrary'),
    (_Sneaky(), 'refused getattr'),
])
def test_weights_only_stays_on(tmp_path, payload, reason):
    path = tmp_path / 'unsafe.pth'
    torch.save(dict(state_dict={}, meta=dict(x=payload)), str(path))
    with pytest.raises(CheckpointLoadError) as info:
        load_from_local(str(path))
    assert 'unsafe.pth' in str(info.value)
    assert reason in str(info.value)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
