"""Shared by the INT8 and ONNX-evaluation tests: demo configs pointed at the
tiny generated data sets, and models with generic weights."""
import os.path as osp

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CLS = osp.join(REPO, 'configs', 'demo', 'resnet18_demo-cls.py')
DEMO_SEG = osp.join(REPO, 'configs', 'demo', 'pspnet_r18_demo-seg.py')
DEMO_DET = osp.join(REPO, 'configs', 'demo', 'rtmdet_demo-det.py')


def data_config(tmp_path, base, data_root, extra='', name='cfg'):
    """A config in ``tmp_path`` inheriting ``base`` whose loaders read
    ``data_root`` in the main process; ``extra`` lines appended.

    A unique ``experiment_name`` keeps in-process runners from sharing a
    logger with a previous test's closed stream."""
    lines = [f"_base_ = ['{base}']",
             f"experiment_name = '{tmp_path.name}_{name}'"]
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        lines.append(f"{loader} = dict(num_workers=0, persistent_workers="
                     f"False, dataset=dict(data_root='{data_root}'))")
    if base == DEMO_DET:  # CocoMetric reads the annotations itself
        ann = osp.join(data_root, 'annotations', 'instances_val.json')
        lines += [f"val_evaluator = dict(ann_file='{ann}')",
                  'test_evaluator = val_evaluator']
    path = tmp_path / f'{name}.py'
    path.write_text('\n'.join(lines) + '\n' + extra + '\n')
    return str(path)


def generic_weights(model, seed=0):
    """Re-draw BatchNorm statistics and affine parameters so that the
    network's predictions vary across images (fresh BatchNorms make a
    randomly initialised network predict nearly one class)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model


def save_checkpoint(model, path):
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, str(path))
    return str(path)


def fit_classifier_head(model):
    """Fit the linear head of a classifier to its config's train images
    (ridge regression on the pooled features): a random backbone then
    predicts several classes, so agreement tests can fail."""
    from cpd_mm.deploy.data import build_loader, preprocessed_batches
    loader, _, _ = build_loader(model.cfg, 'train', test_pipeline=True)
    feats, labels = [], []
    with torch.no_grad():
        for x, samples, _ in preprocessed_batches(loader,
                                                  model.data_preprocessor):
            feats.append(model.extract_feat(x)[-1])
            labels += [int(s.gt_label[0]) for s in samples]
        f = torch.cat(feats)
        mean, std = f.mean(0), f.std(0) + 1e-6
        f = torch.cat([(f - mean) / std, torch.ones(len(f), 1)], 1)
        y = torch.nn.functional.one_hot(
            torch.tensor(labels), model.head.fc.out_features).float()
        w = torch.linalg.solve(f.T @ f + 1e-1 * torch.eye(f.shape[1]),
                               f.T @ y).T
        fc = model.head.fc
        fc.weight.copy_(w[:, :-1] / std)
        fc.bias.copy_(w[:, -1] - (w[:, :-1] / std) @ mean)
    return model
