#!/usr/bin/env python
"""Export a (pruned) MMPretrain / MMSegmentation / MMDetection model to ONNX,
verify it, time it.

Examples::

    # export + check against PyTorch + 1000 timed onnxruntime runs
    python tools/export_onnx.py configs/demo/resnet18_demo-cls.py \\
        work_dirs/demo/pruned.pth --verify --benchmark
    # side-by-side with the unpruned model, machine-readable result
    python tools/export_onnx.py CONFIG PRUNED.pth --compare-to ORIG.pth \\
        --runs 200 --json result.json

A checkpoint whose ``meta['cpd_plan']`` holds a pruning plan is rebuilt from
the original config and shrunk with the plan before its weights are loaded
(:func:`cpd_mm.apis.init_model`), so the exported graph is the small one.
The graph maps the preprocessed image ``input`` [N, C, H, W] to ``logits``
(classifiers, segmenters) or, for single-stage detectors, to the raw maps of
the dense head, one output per kind and FPN level (``cls_score_0``, ...,
``bbox_pred_0``, ...; no NMS in the graph); see :mod:`cpd_mm.deploy.wrappers`.

Exit status: 0 on success; 1 when a checkpoint cannot be used, an output
exists (without ``--force``), the model has an op without ONNX form or is of
a kind that is not exported (two-stage detectors), or the
verification fails (the ONNX file is then not written); 2 for bad arguments.
``--json`` is written only on success.
Set ``CPD_MM_TRACEBACK=1`` to see the traceback of an error.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

import numpy as np
from mmengine.config import DictAction

import cpd_mm
from cpd_mm.apis import CheckpointError, init_model
from cpd_mm.deploy import (DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL,
                           VerificationError, benchmark_sessions,
                           check_output_path, comparison, comparison_table,
                           create_session, default_input_shape,
                           default_output_path, export_onnx, input_channels,
                           latency_summary, model_complexity, model_task,
                           select_providers, verify_onnx, write_json)
from cpd_mm.deploy.benchmark import require_onnxruntime
from cpd_mm.deploy.complexity import format_count
from cpd_mm.deploy.onnx_export import ExportError, require_onnxsim
from cpd_mm.deploy.wrappers import UnsupportedModelError
from cpd_mm.deploy.report import JSON_SCHEMA_VERSION


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description='Export an MMPretrain classifier, MMSegmentation '
        'segmentor or MMDetection single-stage detector (pruned or not) to '
        'ONNX; optionally verify it against PyTorch and time it with '
        'onnxruntime.')
    p.add_argument('config', help='model config (the original, unpruned one)')
    p.add_argument('checkpoint', help='checkpoint, pruned (meta["cpd_plan"]) '
                   'or not')
    p.add_argument('--out', help='output .onnx (default: the checkpoint path '
                   'with .onnx)')
    p.add_argument('--shape', type=int, nargs='+', metavar='N',
                   help='input H W (or one value for a square); default: '
                   'from the config test pipeline / crop size')
    p.add_argument('--batch', type=int, default=1, help='batch size')
    p.add_argument('--dynamic-batch', action='store_true',
                   help='make the batch axis of input and output dynamic')
    p.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                   help='ONNX opset version')
    p.add_argument('--simplify', action='store_true',
                   help='simplify the graph with onnxsim')
    p.add_argument('--verify', action='store_true',
                   help='compare onnxruntime and PyTorch outputs; fail if '
                   'they differ beyond --atol/--rtol')
    p.add_argument('--atol', type=float, default=DEFAULT_ATOL)
    p.add_argument('--rtol', type=float, default=DEFAULT_RTOL)
    p.add_argument('--benchmark', action='store_true',
                   help='time the graph with onnxruntime')
    p.add_argument('--runs', type=int, default=1000, help='timed runs')
    p.add_argument('--warmup', type=int, default=50, help='untimed runs '
                   'before timing')
    p.add_argument('--threads', type=int, default=0, help='onnxruntime '
                   'intra-op threads (0: its default)')
    p.add_argument('--providers', nargs='+', metavar='EP',
                   help='onnxruntime execution providers in priority order '
                   '(default: CUDA if available, else CPU)')
    p.add_argument('--compare-to', metavar='CHECKPOINT',
                   help='unpruned checkpoint to compare with (implies '
                   '--benchmark): parameters, FLOPs, latency, speed-up')
    p.add_argument('--compare-config', metavar='CONFIG',
                   help='config of --compare-to (default: CONFIG)')
    p.add_argument('--json', metavar='FILE', help='write the results as JSON')
    p.add_argument('--force', action='store_true',
                   help='overwrite existing --out / --json files')
    p.add_argument('--device', help='PyTorch device (default: cuda if '
                   'available, else cpu)')
    p.add_argument('--cfg-options', nargs='+', action=DictAction,
                   help='override config settings, key=value (applied to '
                   'both models)')
    args = p.parse_args(argv)

    if args.shape is not None and (len(args.shape) not in (1, 2)
                                   or min(args.shape) < 1):
        p.error(f'--shape takes H W or one size > 0, got {args.shape}')
    for name, low in (('batch', 1), ('runs', 1), ('warmup', 0),
                      ('threads', 0), ('opset', 7)):
        if getattr(args, name) < low:
            p.error(f'--{name.replace("_", "-")} must be >= {low}, but got '
                    f'{getattr(args, name)}')
    if args.atol < 0 or args.rtol < 0:
        p.error('--atol and --rtol must be >= 0')
    if args.compare_config and not args.compare_to:
        p.error('--compare-config needs --compare-to')
    args.out = args.out or default_output_path(args.checkpoint)
    args.benchmark = args.benchmark or bool(args.compare_to)
    return args


def _preflight(args):
    """Every check that can fail before minutes of work are spent."""
    check_output_path(args.out, args.force)
    if args.json:
        check_output_path(args.json, args.force)
        if osp.abspath(args.json) == osp.abspath(args.out):
            raise ValueError('--json and --out are the same file')
    for path in (args.checkpoint, args.compare_to):
        if path and '://' not in path and not osp.isfile(path):
            raise CheckpointError(f'checkpoint file not found: {path}')
    if args.simplify:
        require_onnxsim()
    if args.verify or args.benchmark:
        require_onnxruntime()
        args.providers = select_providers(args.providers)


def _export_one(model, args, out, shape, channels, force, label):
    """Export, with verification on the temporary file when asked."""
    verified = {}

    def check(tmp):
        batches = [args.batch, args.batch + 1] if args.dynamic_batch else [
            args.batch]
        verified.update(verify_onnx(model, tmp, (channels, *shape), batches,
                                    args.atol, args.rtol, args.providers))

    info = export_onnx(model, out, shape, args.batch, channels, args.opset,
                       args.dynamic_batch, args.simplify, force,
                       before_publish=check if args.verify else None)
    if len(info['output_names']) == 1:
        outputs = f'output {info["output_shape"]}'
    else:
        outputs = f'{len(info["output_names"])} outputs ' + ', '.join(
            f'{n} {s}' for n, s in zip(info['output_names'],
                                       info['output_shapes']))
    print(f'[{label}] exported {info["task"]} model to {out} '
          f'({info["size_bytes"] / 1e6:.2f} MB, opset {args.opset}, '
          f'input {info["input_shape"]}, {outputs}'
          f'{", dynamic batch" if args.dynamic_batch else ""})')
    if verified:
        print(f'[{label}] verified with {verified["provider"]}: max |ort - '
              f'torch| = {verified["max_abs_diff"]:.3g} (relative '
              f'{verified["max_rel_diff"]:.3g}) within atol={args.atol:g}, '
              f'rtol={args.rtol:g}; argmax agreement '
              f'{verified["argmax_agreement"]:.2%}')
    return info, verified or None


def _complexity(model, args, shape, channels, label):
    complexity = model_complexity(model, (args.batch, channels, *shape))
    print(f'[{label}] parameters {format_count(complexity["params"])}, '
          f'FLOPs {format_count(complexity["flops"])} (batch {args.batch})')
    return complexity


def _benchmark(paths, labels, args, shape, channels):
    """Interleaved onnxruntime timing of the graphs in ``paths``."""
    sessions = [create_session(p, args.providers, args.threads) for p in paths]
    provider = sessions[0].get_providers()[0]
    if provider != args.providers[0]:
        print(f'WARNING: {args.providers[0]} failed to initialise; '
              f'onnxruntime fell back to {provider}')
    print(f'benchmarking {" and ".join(labels)} with provider {provider}: '
          f'{args.warmup} warm-up + {args.runs} timed runs each'
          + (', interleaved' if len(paths) > 1 else ''))
    x = np.random.default_rng(0).standard_normal(
        (args.batch, channels, *shape)).astype(np.float32)
    results = benchmark_sessions(sessions, x, args.runs, args.warmup)
    if len(results) == 1:
        print(latency_summary(results[0]))
    return results


def run(args) -> dict:
    """Do what ``args`` ask; return the JSON report (see module docstring)."""
    _preflight(args)
    model = init_model(args.config, args.checkpoint, args.device,
                       args.cfg_options)
    task = model_task(model)
    pruned = model.cpd_plan is not None
    print(f'loaded {task} model {type(model).__name__} from '
          f'{args.checkpoint}' + (' (pruning plan applied)' if pruned else ''))
    if args.shape:
        shape, source = (args.shape[0], args.shape[-1]), '--shape'
    else:
        shape, source = default_input_shape(model.cfg, task)
        if shape is None:
            raise ValueError(f'cannot infer the input size from {args.config}'
                             '; pass --shape H W')
    channels = input_channels(model.cfg)
    print(f'input size {shape[0]}x{shape[1]} (from {source}), {channels} '
          'channels')

    label = 'pruned' if args.compare_to else 'model'
    info, verified = _export_one(model, args, args.out, shape, channels,
                                 args.force, label)
    complexity = _complexity(model, args, shape, channels, label)
    report = dict(
        schema_version=JSON_SCHEMA_VERSION,
        cpd_mm_version=cpd_mm.__version__,
        config=osp.abspath(args.config),
        checkpoint=osp.abspath(args.checkpoint),
        task=task,
        pruned=pruned,
        device=str(next(model.parameters()).device),
        input_size=list(shape),
        input_size_source=source,
        onnx=info,
        params=complexity['params'],
        flops=complexity['flops'],
        verify=verified,
        benchmark=None,
        compare=None)

    if not args.compare_to:
        if args.benchmark:
            report['benchmark'] = _benchmark([args.out], [label], args,
                                             shape, channels)[0]
    else:
        config = args.compare_config or args.config
        original = init_model(config, args.compare_to, args.device,
                              args.cfg_options)
        with tempfile.TemporaryDirectory() as tmpdir:
            path = osp.join(tmpdir, 'original.onnx')
            _, orig_verified = _export_one(original, args, path, shape,
                                           channels, True, 'original')
            orig_complexity = _complexity(original, args, shape, channels,
                                          'original')
            orig_stats, stats = _benchmark([path, args.out],
                                           ['original', label], args,
                                           shape, channels)
        report['benchmark'] = stats
        entries = dict(
            original=dict(config=osp.abspath(config),
                          checkpoint=osp.abspath(args.compare_to),
                          **orig_complexity, benchmark=orig_stats,
                          verify=orig_verified),
            pruned=dict(config=report['config'],
                        checkpoint=report['checkpoint'], **complexity,
                        benchmark=stats, verify=verified))
        print(comparison_table(entries['original'], entries['pruned']))
        report['compare'] = dict(
            **entries, **comparison(entries['original'], entries['pruned']))

    if args.json:
        write_json(report, args.json, args.force)
        print(f'results written to {args.json}')
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, VerificationError, ExportError, FileExistsError,
            IsADirectoryError, ImportError, ValueError,
            UnsupportedModelError) as exc:
        if os.environ.get('CPD_MM_TRACEBACK') == '1':  # as tools/train.py
            raise
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
