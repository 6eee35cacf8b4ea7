"""Shared pytest fixtures: repository paths and tiny generated data sets."""
import os
import os.path as osp
import subprocess
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# The machine is small and shared: keep every torch process to two threads.
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def repo_root():
    """Absolute path of the repository (configs/, tools/ live here)."""
    return REPO


@pytest.fixture(scope='session')
def tiny_cls_data(tmp_path_factory):
    """A tiny classification set (6 classes, 24 train / 12 val, 32x32)."""
    from cpd_mm.datasets.demo_data import make_classification_set
    root = str(tmp_path_factory.mktemp('demo') / 'cls')
    make_classification_set(root, num_train=24, num_val=12, image_size=32,
                            seed=0, num_classes=6)
    return root


@pytest.fixture(scope='session')
def tiny_seg_data(tmp_path_factory):
    """A tiny segmentation set (5 classes, 8 train / 4 val, 64x64)."""
    from cpd_mm.datasets.demo_data import make_segmentation_set
    root = str(tmp_path_factory.mktemp('demo') / 'seg')
    make_segmentation_set(root, num_train=8, num_val=4, image_size=64,
                          seed=0, num_classes=5)
    return root


@pytest.fixture(scope='session')
def tiny_det_data(tmp_path_factory):
    """A tiny COCO-format detection set (4 classes, 16 train / 8 val,
    96x96)."""
    from cpd_mm.datasets.demo_det import make_detection_set
    root = str(tmp_path_factory.mktemp('demo') / 'det')
    make_detection_set(root, num_train=16, num_val=8, image_size=96, seed=0,
                       num_classes=4)
    return root


@pytest.fixture(scope='session')
def run_tool():
    """``run_tool(script, *args)`` runs ``tools/<script>`` in a subprocess.

    Uses this interpreter, the repository as working directory (configs use
    relative paths) and two threads; returns the CompletedProcess (text).
    """

    def run(script, *args, timeout=600):
        env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONUNBUFFERED='1')
        env.pop('CPD_MM_TRACEBACK', None)
        return subprocess.run(
            [sys.executable, osp.join(REPO, 'tools', script),
             *map(str, args)],
            cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout)

    return run
