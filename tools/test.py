"""Evaluate a checkpoint with an MMPretrain or MMSegmentation config.

Same command line as the upstream ``tools/test.py`` of both projects::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--cfg-options KEY=VALUE ...]
        [--launcher none|pytorch|slurm|mpi]

An exported graph instead of a checkpoint (``CONFIG model.onnx``, FP32 or
INT8, from tools/export_onnx.py) is evaluated under onnxruntime with the
config's test loader and evaluator (:mod:`cpd_mm.deploy.onnx_eval`): the
accuracy of the deployed model. ``--providers`` and ``--threads`` pick the
onnxruntime session; ``--out`` dumps its predictions as for a checkpoint.

A missing checkpoint or data root, or a failed model-zoo download, is
reported before the runner is built; a pruned checkpoint prunes the model
built from the config to its plan (``CPDRunner``) before the weights load.
"""
import argparse
import os.path as osp
import warnings

# mmengine and mmcv import pkg_resources, which setuptools deprecates: noise
# that would bury the one-line error messages of these tools.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
from mmengine.config import DictAction  # noqa: E402
from mmengine.evaluator import DumpResults  # noqa: E402

import cpd_mm  # noqa: F401,E402  (registers modules, safe checkpoint loading)
from cpd_mm.prune import CPDRunner  # noqa: E402
from cpd_mm.utils.cli import (  # noqa: E402
    CLIError, build_runner, check_checkpoint, check_data_paths, check_file,
    check_hooks,
    check_launcher, load_config, merge_cfg_options,
    refuse_pruned_checkpoint, run_cli, set_local_rank)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir',
                        help='the dir to save the file of evaluation metrics')
    parser.add_argument('--out',
                        help='dump the predictions to this pickle file '
                        '(.pkl) for offline evaluation')
    parser.add_argument('--show-dir',
                        help='save images drawn with their predictions here')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs; the key '
        'must address the config (parents must exist)')
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--providers', nargs='+', metavar='EP',
                        help='onnxruntime execution providers (ONNX only)')
    parser.add_argument('--threads', type=int, default=0,
                        help='onnxruntime intra-op threads (ONNX only; 0: '
                        'its default)')
    args = parser.parse_args(argv)
    set_local_rank(args.local_rank)
    return args


def enable_visualization(cfg, show_dir):
    """Turn on the config's visualization hook, saving to ``show_dir``.

    MMPretrain's ``VisualizationHook`` takes ``enable`` and ``out_dir``;
    MMSegmentation's ``SegVisualizationHook`` takes ``draw`` and saves through
    the visualizer's ``save_dir``.
    """
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise CLIError('--show-dir needs a "visualization" hook in '
                       'default_hooks of the config')
    if 'Seg' in str(hook.get('type', '')):
        hook['draw'] = True
        cfg.visualizer['save_dir'] = show_dir
    else:
        hook['enable'] = True
        hook['out_dir'] = show_dir


def merge_args(cfg, args):
    """Apply the command line to the config (upstream semantics)."""
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    return cfg


def test_onnx(args):
    """Evaluate an exported graph (FP32 or INT8) with onnxruntime."""
    from cpd_mm.deploy.data import DataConfigError
    from cpd_mm.deploy.onnx_eval import GraphInputError, evaluate_onnx
    if args.launcher != 'none' or args.show_dir:
        raise CLIError('an ONNX graph is evaluated in one process without '
                       '--show-dir; drop --launcher / --show-dir')
    check_file(args.checkpoint, 'ONNX model')
    cfg = load_config(args.config)
    merge_cfg_options(cfg, args.cfg_options)
    check_data_paths(cfg, ['test_dataloader'])
    try:
        return evaluate_onnx(cfg, args.checkpoint, args.providers,
                             args.threads, out=args.out)
    except (DataConfigError, GraphInputError, ValueError) as e:
        raise CLIError(str(e)) from e


def main(argv=None):
    """Evaluate; return the metrics. User errors raise CLIError."""
    args = parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise CLIError(f'--out must be a .pkl or .pickle file, got {args.out}')
    if args.checkpoint.endswith('.onnx'):
        return test_onnx(args)
    check_launcher(args.launcher)
    cfg = load_config(args.config)
    check_checkpoint(args.checkpoint)  # fail before the slow runner build
    merge_cfg_options(cfg, args.cfg_options)
    merge_args(cfg, args)
    check_hooks(cfg)
    check_data_paths(cfg, ['test_dataloader'])
    if args.launcher == 'none':
        check_checkpoint(args.checkpoint, download=True)
    runner = build_runner(cfg)
    if not isinstance(runner, CPDRunner):
        refuse_pruned_checkpoint(runner, args.checkpoint)
    try:
        if args.out:
            runner.test_evaluator.metrics.append(
                DumpResults(out_file_path=args.out))
        return runner.test()
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e


if __name__ == '__main__':
    run_cli(main)
