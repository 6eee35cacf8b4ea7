"""Train a model from an MMPretrain or MMSegmentation config.

Same command line as the upstream ``tools/train.py`` of both projects::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [auto|CKPT]]
        [--amp] [--no-validate] [--auto-scale-lr]
        [--cfg-options KEY=VALUE ...] [--launcher none|pytorch|slurm|mpi]

``import cpd_mm`` comes first so that its hooks and models are registered
and runner-written checkpoints load safely (``--resume``).
"""
import argparse
import os.path as osp
import warnings

# mmengine and mmcv import pkg_resources, which setuptools deprecates: noise
# that would bury the one-line error messages of these tools.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
from mmengine.config import DictAction  # noqa: E402

import cpd_mm  # noqa: F401,E402  (registers modules, safe checkpoint loading)
from cpd_mm.prune import CPDRunner  # noqa: E402
from cpd_mm.utils.cli import (  # noqa: E402
    CLIError, build_runner, check_checkpoint, check_data_paths, check_file,
    check_hooks, check_launcher, load_config, merge_cfg_options,
    refuse_pruned_checkpoint, run_cli, set_local_rank)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint; without a value, from the latest '
        'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic mixed precision training')
    parser.add_argument('--no-validate', action='store_true',
                        help='do not evaluate checkpoints during training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate with the batch size')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs; the key '
        'must address the config (parents must exist), e.g. '
        'train_cfg.max_epochs=3')
    parser.add_argument('--launcher',
                        choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torchrun passes LOCAL_RANK in the environment; torch.distributed.launch
    # passes --local-rank (torch>=2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    set_local_rank(args.local_rank)
    return args


def merge_args(cfg, args):
    """Apply the command line to the config (upstream semantics)."""
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper not in ('OptimWrapper', 'AmpOptimWrapper'):
            raise CLIError(f'--amp needs optim_wrapper type OptimWrapper or '
                           f'AmpOptimWrapper, but the config has {wrapper}')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in \
                cfg.auto_scale_lr:
            raise CLIError('--auto-scale-lr needs auto_scale_lr.'
                           'base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, check_file(args.resume,
                                                     'checkpoint to resume')
    return cfg


def main(argv=None):
    """Train; return the runner. User errors raise CLIError (one line).

    Missing files (``load_from``, data roots) and failed model-zoo downloads
    are reported before the runner is built. A pruned ``load_from`` is
    applied by CPDRunner before the model is wrapped for DDP.
    """
    args = parse_args(argv)
    check_launcher(args.launcher)
    cfg = load_config(args.config)
    merge_cfg_options(cfg, args.cfg_options)
    merge_args(cfg, args)
    check_hooks(cfg)
    checkpoint = cfg.get('load_from')
    what = 'checkpoint to resume' if cfg.get('resume') else 'load_from'
    if checkpoint:
        check_checkpoint(checkpoint, what)
    check_data_paths(cfg, ['train_dataloader', 'val_dataloader'])
    if checkpoint and args.launcher == 'none':
        # distributed runs download on rank 0 inside the runner
        check_checkpoint(checkpoint, what, download=True)
    runner = build_runner(cfg)
    if checkpoint and not isinstance(runner, CPDRunner):
        refuse_pruned_checkpoint(runner, checkpoint)
    try:
        runner.train()
    except FileNotFoundError as e:
        # e.g. a file listed in an annotation file is missing
        hint = (' (generate the demo data with python tools/make_demo_data.py)'
                if 'data/demo' in str(e) else '')
        raise CLIError(f'{e}{hint}') from e
    return runner


if __name__ == '__main__':
    run_cli(main)
