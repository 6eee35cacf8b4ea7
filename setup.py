"""Install cpd_mm: ``pip install -e .[tests]`` (see tools/setup_env.sh)."""
import os.path as osp

from setuptools import find_packages, setup


def read_version():
    ns = {}
    with open(osp.join(osp.dirname(__file__), 'cpd_mm', 'version.py')) as f:
        exec(f.read(), ns)
    return ns['__version__']


setup(
    name='cpd_mm',
    version=read_version(),
    description='Comb, Prune, Distill: structured pruning for MMPretrain, '
    'MMSegmentation and MMDetection models (arXiv 2408.03046)',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'configs', 'tools', 'benchmarks')),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1',
        'torchvision>=0.16',
        'numpy',
        'Pillow',  # the demo data generator writes images with it
        'mmengine>=0.10.0,<0.11',
        # MMSegmentation 1.2.2 asserts mmcv < 2.2.0, and imports mmcv.ops,
        # so mmcv must be the full build (not mmcv-lite).
        'mmcv>=2.0.0,<2.2.0',
        'mmpretrain>=1.2.0,<1.3',
        'mmsegmentation>=1.2.0,<1.3',
        # mmdet 3.2 is the first release that accepts mmcv 2.1 (3.0 and 3.1
        # assert mmcv < 2.1); tested with 3.3.0, the latest. Its own
        # requirements (pycocotools, scipy, shapely, ...) name no mmcv/torch.
        'mmdet>=3.2.0,<3.4',
        'ftfy',  # imported by mmseg's dataset module
        'regex',
        'onnx>=1.14',
        'matplotlib',
        'prettytable',
    ],
    extras_require={
        # onnxruntime and onnxruntime-gpu cannot be installed side by side:
        # the default runtime is a separate extra from the GPU one.
        'cpu': ['onnxruntime>=1.16'],
        'gpu': ['onnxruntime-gpu>=1.16'],
        # (the tests also check the Torch-Pruning comparison's arms)
        'tests': ['pytest>=7', 'hypothesis>=6', 'onnxruntime>=1.16',
                  'torch-pruning>=1.3'],
        'benchmark': ['torch-pruning>=1.3', 'onnxruntime>=1.16'],
    },
    license='Apache-2.0',
    zip_safe=False,
)
