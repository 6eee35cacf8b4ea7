"""A config's own images, preprocessed as its model does: the calibration
set of INT8 export, the held-out images of its verification, and the
batches that evaluate an exported graph (:mod:`cpd_mm.deploy.onnx_eval`).

The exported graph takes the image *after* the data preprocessor
(:mod:`cpd_mm.deploy.wrappers`), so every image here goes through the
config's dataset pipeline, collate function and the model's
``data_preprocessor`` (mean/std, channel order, padding), run in torch.
"""
import copy
from typing import Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch.utils.data import Subset

__all__ = ['DataConfigError', 'loader_config', 'build_loader',
           'preprocessed_batches', 'preprocessed_images']


class DataConfigError(ValueError):
    """The config lacks the data loader (or data) a step needs."""


def _innermost_dataset(dataset_cfg: dict) -> dict:
    """The dict holding ``pipeline`` (ConcatDataset / RepeatDataset wrap
    theirs in ``dataset``)."""
    while 'pipeline' not in dataset_cfg and isinstance(
            dataset_cfg.get('dataset'), dict):
        dataset_cfg = dataset_cfg['dataset']
    return dataset_cfg


def loader_config(cfg, split: str, test_pipeline: bool = False) -> dict:
    """A copy of ``cfg.<split>_dataloader`` (``split``: 'train', 'val' or
    'test'); with ``test_pipeline`` its dataset reads images through the
    test loader's pipeline (no random augmentation: calibration sees what
    deployment sees).

    Raises:
        DataConfigError: the config has no such loader (naming it).
    """
    key = f'{split}_dataloader'
    loader = cfg.get(key)
    if not loader or not loader.get('dataset'):
        have = [k for k in ('train_dataloader', 'val_dataloader',
                            'test_dataloader') if cfg.get(k)]
        raise DataConfigError(
            f'the config has no {key} (it has {have or "no data loader"}); '
            f'add a {key} with its dataset, or pick another split')
    loader = copy.deepcopy(loader.to_dict() if hasattr(loader, 'to_dict')
                           else dict(loader))
    if test_pipeline:
        source = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        pipeline = (_innermost_dataset(dict(source['dataset'])).get(
            'pipeline') if source else None) or cfg.get('test_pipeline')
        if pipeline:
            _innermost_dataset(loader['dataset'])['pipeline'] = copy.deepcopy(
                list(pipeline))
    return loader


def build_loader(cfg, split: str, count: Optional[int] = None,
                 test_pipeline: bool = False, logger=None):
    """The ``split`` loader of ``cfg`` (no workers, no shuffling), over
    ``count`` images spread evenly over the dataset when given (folder
    datasets list classes in order: the first ``count`` would be one class).

    Returns:
        (DataLoader, dataset metainfo, number of images)

    Raises:
        DataConfigError: no such loader, or an empty dataset.
    """
    from mmengine.dataset import DefaultSampler
    from mmengine.registry import DATASETS, init_default_scope
    from mmengine.runner import Runner
    if cfg.get('default_scope'):
        init_default_scope(cfg.default_scope)
    loader_cfg = loader_config(cfg, split, test_pipeline)
    dataset = DATASETS.build(loader_cfg.pop('dataset'))
    if hasattr(dataset, 'full_init'):
        dataset.full_init()
    metainfo = getattr(dataset, 'metainfo', {})
    total = len(dataset)
    if total == 0:
        raise DataConfigError(f'the {split} set of the config is empty')
    if count is not None:
        if count < 1:
            raise ValueError(f'image count must be >= 1, but got {count}')
        if count > total:
            print_log(f'asked for {count} images of the {split} set, which '
                      f'has {total}: using all {total}', logger=logger,
                      level=30)
        idx = np.unique(np.linspace(0, total - 1, min(count, total)).round()
                        .astype(int))
        dataset = Subset(dataset, idx.tolist())
    loader_cfg.update(dataset=dataset, num_workers=0,
                      persistent_workers=False,
                      sampler=DefaultSampler(dataset, shuffle=False))
    loader_cfg.pop('batch_sampler', None)
    return Runner.build_dataloader(loader_cfg), metainfo, len(dataset)


def preprocessed_batches(loader, preprocessor) -> Iterator[tuple]:
    """``(inputs [N, C, H, W] float32 tensor, data_samples, data_batch)``
    per batch, after ``preprocessor`` (the model's data preprocessor, test
    mode)."""
    with torch.no_grad():
        for data_batch in loader:
            data = preprocessor(data_batch, False)
            yield data['inputs'].float(), data.get('data_samples'), data_batch


def preprocessed_images(cfg, preprocessor, split: str, count: int,
                        input_shape, test_pipeline: bool = True,
                        logger=None) -> List[np.ndarray]:
    """``count`` preprocessed images of ``split`` as ``[1, C, H, W]`` arrays
    at the graph's ``input_shape`` ``(H, W)`` (bilinearly resized, logged,
    where the data has another size: calibration and verification need
    representative activations, not exact pixels)."""
    loader, _, _ = build_loader(cfg, split, count, test_pipeline, logger)
    out, resized = [], None
    for inputs, _, _ in preprocessed_batches(loader, preprocessor):
        if tuple(inputs.shape[2:]) != tuple(input_shape):
            resized = tuple(inputs.shape[2:])
            inputs = F.interpolate(inputs, size=tuple(input_shape),
                                   mode='bilinear', align_corners=False)
        out.extend(x[None].cpu().numpy() for x in inputs)
    if resized:
        print_log(f'{split} images of size {resized} resized to the graph '
                  f'input {tuple(input_shape)}', logger=logger, level=30)
    return out[:count]
