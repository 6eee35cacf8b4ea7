"""tools/test.py CONFIG model.onnx: an exported graph scored by the config's
own evaluator gives the PyTorch model's accuracy and predictions (FP32), for
a classifier, a segmentor and a single-stage detector; bad input is one
clear line."""
import importlib.util
import os.path as osp
import pickle

import numpy as np
import pytest

pytest.importorskip('onnxruntime')

from cpd_mm.apis import init_model  # noqa: E402
from cpd_mm.deploy import export_onnx  # noqa: E402

from deploy_helpers import (DEMO_CLS, DEMO_DET, DEMO_SEG, REPO,  # noqa: E402
                            data_config, fit_classifier_head,
                            generic_weights, save_checkpoint)


@pytest.fixture(scope='module')
def test_tool():
    path = osp.join(REPO, 'tools', 'test.py')
    spec = importlib.util.spec_from_file_location('test_tool_onnx', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def both(test_tool, tmp_path, base, data_root, shape):
    """Metrics and dumped predictions of the checkpoint (PyTorch) and of its
    FP32 export (onnxruntime)."""
    cfg = data_config(tmp_path, base, data_root)
    model = generic_weights(init_model(cfg, device='cpu'))
    if base == DEMO_CLS:
        fit_classifier_head(model)
    ckpt = save_checkpoint(model, tmp_path / 'model.pth')
    graph = str(tmp_path / 'model.onnx')
    export_onnx(model, graph, shape)
    out = {}
    for name, path in (('torch', ckpt), ('onnx', graph)):
        pkl = str(tmp_path / f'{name}.pkl')
        metrics = test_tool.main([cfg, path, '--work-dir',
                                  str(tmp_path / name), '--out', pkl])
        with open(pkl, 'rb') as f:
            out[name] = (metrics, pickle.load(f))
    return out


def same_metrics(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-4), k


def test_classifier_onnx_matches_pytorch(test_tool, tmp_path, tiny_cls_data):
    res = both(test_tool, tmp_path, DEMO_CLS, tiny_cls_data, (32, 32))
    (m_t, p_t), (m_o, p_o) = res['torch'], res['onnx']
    same_metrics(m_t, m_o)
    labels = [[int(p['pred_label'][0]) for p in preds]
              for preds in (p_t, p_o)]
    assert labels[0] == labels[1] and len(set(labels[0])) > 1
    for a, b in zip(p_t, p_o):
        np.testing.assert_allclose(a['pred_score'], b['pred_score'],
                                   atol=1e-4)


def test_segmentor_onnx_matches_pytorch(test_tool, tmp_path, tiny_seg_data):
    res = both(test_tool, tmp_path, DEMO_SEG, tiny_seg_data, (64, 64))
    (m_t, p_t), (m_o, p_o) = res['torch'], res['onnx']
    same_metrics(m_t, m_o)
    for a, b in zip(p_t, p_o):
        sa, sb = (np.asarray(p['pred_sem_seg']['data']) for p in (a, b))
        assert sa.shape == sb.shape
        assert (sa == sb).mean() > 0.999  # float ties at a few pixels


def test_detector_onnx_matches_pytorch(test_tool, tmp_path, tiny_det_data):
    """The head's own predict_by_feat decodes the ONNX maps (priors, NMS,
    rescale): the same boxes as the PyTorch detector."""
    pytest.importorskip('mmdet')
    res = both(test_tool, tmp_path, DEMO_DET, tiny_det_data, (96, 96))
    (m_t, p_t), (m_o, p_o) = res['torch'], res['onnx']
    same_metrics(m_t, m_o)
    boxes = 0
    for a, b in zip(p_t, p_o):
        ia, ib = a['pred_instances'], b['pred_instances']
        assert len(ia['scores']) == len(ib['scores'])
        np.testing.assert_allclose(ia['bboxes'], ib['bboxes'], atol=1e-3)
        np.testing.assert_allclose(ia['scores'], ib['scores'], atol=1e-5)
        assert (np.asarray(ia['labels']) == np.asarray(ib['labels'])).all()
        boxes += len(ia['scores'])
    assert boxes > 0


def fails(test_tool, argv, capsys):
    with pytest.raises(SystemExit) as info:
        test_tool.run_cli(lambda: test_tool.main([str(a) for a in argv]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'Traceback' not in err
    return err


def test_bad_input(test_tool, tmp_path, capsys, tiny_cls_data):
    cfg = data_config(tmp_path, DEMO_CLS, tiny_cls_data)
    err = fails(test_tool, [cfg, tmp_path / 'missing.onnx'], capsys)
    assert 'missing.onnx' in err and 'does not exist' in err

    graph = str(tmp_path / 'model.onnx')
    export_onnx(init_model(cfg, device='cpu'), graph, (48, 48))
    err = fails(test_tool, [cfg, graph], capsys)
    assert 'takes 48x48 images' in err and '--shape 32 32' in err

    no_test = data_config(tmp_path, DEMO_CLS, tiny_cls_data, name='no_test',
                          extra='test_dataloader = None\ntest_cfg = None\n'
                          'test_evaluator = None')
    err = fails(test_tool, [no_test, graph], capsys)
    assert 'no test_dataloader' in err
