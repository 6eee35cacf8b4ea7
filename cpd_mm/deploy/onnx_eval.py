"""Accuracy of an exported graph (FP32 or INT8) on a config's test set with
the upstream evaluator: the deployed model's accuracy, not PyTorch's.

Per batch of the config's ``test_dataloader``: the model's data
preprocessor runs in torch, onnxruntime runs the graph, and its outputs go
back into the data samples the way the PyTorch model's ``predict`` fills
them, so the config's ``test_evaluator`` (mmpretrain ``Accuracy``, mmseg
``IoUMetric``, mmdet ``CocoMetric``, ...) scores them unchanged:

- classifier: ``pred_score`` = softmax of the logits, ``pred_label`` its
  argmax (as ``ClsHead.predict``);
- segmentor: the logits through the segmentor's own ``postprocess_result``
  (padding removed, resized to the original image, argmax);
- single-stage detector: the head maps through the head's
  ``predict_by_feat`` (prior decoding, score threshold, NMS from the
  config's ``test_cfg``, rescale to the original image) and the detector's
  ``add_pred_to_datasample``.

The torch model is built from the config (random weights: only its data
preprocessor, post-processing and head decoding are used, none of which
has weights), so this works for a pruned graph with the original config.
"""
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from .benchmark import create_session
from .data import build_loader, preprocessed_batches
from .wrappers import CLASSIFICATION, DETECTION, SEGMENTATION, model_task

__all__ = ['evaluate_onnx', 'GraphInputError']


class GraphInputError(ValueError):
    """The graph's fixed input shape does not fit the test images."""


def _graph_batches(inputs: torch.Tensor, graph_shape) -> list:
    """Split a batch into the chunks the graph takes (fixed or symbolic
    batch axis), checking the image size."""
    batch, _, h, w = graph_shape
    if all(isinstance(s, int) for s in (h, w)) and tuple(
            inputs.shape[2:]) != (h, w):
        raise GraphInputError(
            f'the graph takes {h}x{w} images but the test pipeline gives '
            f'{tuple(inputs.shape[2:])}; export at that size (--shape '
            f'{inputs.shape[2]} {inputs.shape[3]})')
    step = batch if isinstance(batch, int) else len(inputs)
    x = inputs.cpu().numpy()
    return [x[i:i + step] for i in range(0, len(x), step)]


def _run(session, inputs: torch.Tensor, graph_shape) -> list:
    """The graph's outputs for ``inputs``, chunks concatenated."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: c})
            for c in _graph_batches(inputs, graph_shape)]
    return [torch.from_numpy(np.concatenate([o[k] for o in outs]))
            for k in range(len(outs[0]))]


def _classifier_samples(model, outputs, data_samples):
    scores = F.softmax(outputs[0].float(), dim=1)
    labels = scores.argmax(dim=1, keepdim=True)
    for sample, score, label in zip(data_samples, scores, labels):
        sample.set_pred_score(score).set_pred_label(label)
    return data_samples


def _segmentor_samples(model, outputs, data_samples):
    return model.postprocess_result(outputs[0].float(), data_samples)


def _detector_samples(model, outputs, data_samples, names):
    head = model.bbox_head
    levels = len(head.prior_generator.strides)
    kinds = [outputs[i:i + levels] for i in range(0, len(outputs), levels)]
    if len(names) != len(outputs) or len(outputs) % levels:
        raise GraphInputError(
            f'the graph has outputs {names}, not the {levels}-level head '
            'maps of the config\'s detector (was it exported from it?)')
    metas = [s.metainfo for s in data_samples]
    results = head.predict_by_feat(*kinds, batch_img_metas=metas,
                                   rescale=True)
    return model.add_pred_to_datasample(data_samples, results)


def evaluate_onnx(config, onnx_path: str,
                  providers: Optional[Sequence[str]] = None,
                  threads: int = 0, cfg_options: Optional[dict] = None,
                  split: str = 'test', device: Optional[str] = None,
                  out: Optional[str] = None, logger='current') -> dict:
    """Evaluate ``onnx_path`` with ``config``'s ``<split>_dataloader`` and
    ``<split>_evaluator``; returns the evaluator's metrics (e.g.
    ``{'accuracy/top1': 87.4}``). ``out``: also dump the predictions to
    this ``.pkl`` (mmengine ``DumpResults``, as ``tools/test.py --out``).

    Raises:
        DataConfigError: the config has no such loader / evaluator.
        GraphInputError: the graph's input size does not fit the images.
    """
    from mmengine.evaluator import DumpResults, Evaluator

    from ..apis import init_model
    from .data import DataConfigError
    model = init_model(config, None, device or 'cpu', cfg_options)
    cfg = model.cfg
    task = model_task(model)
    loader, metainfo, total = build_loader(cfg, split, logger=logger)
    if not cfg.get(f'{split}_evaluator'):
        raise DataConfigError(f'the config has no {split}_evaluator to '
                              'score the graph with')
    evaluator = cfg[f'{split}_evaluator']
    evaluator = Evaluator(evaluator if isinstance(evaluator, (list, tuple))
                          else [evaluator])
    if out:
        evaluator.metrics.append(DumpResults(out_file_path=out))
    evaluator.dataset_meta = metainfo
    session = create_session(onnx_path, providers, threads)
    graph_shape = session.get_inputs()[0].shape
    names = [o.name for o in session.get_outputs()]
    print_log(f'evaluating {onnx_path} ({task}, provider '
              f'{session.get_providers()[0]}) on {total} {split} images',
              logger=logger)
    for inputs, samples, data_batch in preprocessed_batches(
            loader, model.data_preprocessor):
        outputs = _run(session, inputs, graph_shape)
        if task == CLASSIFICATION:
            samples = _classifier_samples(model, outputs, samples)
        elif task == SEGMENTATION:
            samples = _segmentor_samples(model, outputs, samples)
        else:
            assert task == DETECTION
            samples = _detector_samples(model, outputs, samples, names)
        evaluator.process(data_samples=samples, data_batch=data_batch)
    metrics = {k: float(v) if isinstance(v, np.floating) else v
               for k, v in evaluator.evaluate(total).items()}
    print_log('ONNX ' + '  '.join(
        f'{k}: {float(v):.4f}' if isinstance(v, (float, np.floating))
        else f'{k}: {v}'
        for k, v in metrics.items()), logger=logger)
    return metrics
