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
    # INT8 (onnxruntime static QDQ, per-channel) calibrated on 256 train
    # images, checked against FP32 on val images, timed against FP32 ORIG
    python tools/export_onnx.py CONFIG PRUNED.pth --int8 --calib 256 \\
        --verify --compare-to ORIG.pth

``--int8`` exports the FP32 graph to a temporary file (verified against
PyTorch with ``--verify``), calibrates on ``--calib`` images of the config's
own ``--calib-split`` loader (test pipeline, the model's preprocessor),
quantizes (:mod:`cpd_mm.deploy.quantize`) and, with ``--verify``, requires
INT8 and FP32 predictions to agree on ``--min-agreement`` of held-out val
images (or pixels). The INT8 file is written only when onnxruntime really
quantized compute nodes and the verification passed; ``--compare-to`` then
times it against the FP32 graph of the unpruned model.

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
from cpd_mm.deploy.data import DataConfigError
from cpd_mm.deploy.int8 import (DEFAULT_CALIB, DEFAULT_MIN_AGREEMENT,
                                export_int8)
from cpd_mm.deploy.quantize import (CALIBRATION_METHODS, TARGETS,
                                    QuantizationError)
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
    q = p.add_argument_group('INT8')
    q.add_argument('--int8', action='store_true', help='export an INT8 '
                   'graph (static QDQ, per-channel weights) calibrated on '
                   "the config's data")
    q.add_argument('--calib', type=int, default=DEFAULT_CALIB, metavar='N',
                   help=f'calibration images (default {DEFAULT_CALIB})')
    q.add_argument('--calib-split', default='train',
                   choices=['train', 'val', 'test'],
                   help='loader the calibration images come from (default '
                   'train: none of the images accuracy is measured on)')
    q.add_argument('--calib-method', default='minmax',
                   choices=list(CALIBRATION_METHODS))
    q.add_argument('--int8-target', default='cpu', choices=list(TARGETS),
                   help='cpu: uint8 asymmetric activations (CPU provider, '
                   'OpenVINO); gpu: int8 symmetric (TensorRT, CUDA)')
    q.add_argument('--fp32-nodes', nargs='+', default=[], metavar='NODE',
                   help='names of FP32-graph nodes to keep in FP32')
    q.add_argument('--auto-fp32', type=int, default=0, metavar='K',
                   help='also keep the K nodes in FP32 whose quantization '
                   'costs most (measured on the calibration images)')
    q.add_argument('--min-agreement', type=float,
                   default=DEFAULT_MIN_AGREEMENT,
                   help='--verify: fraction of held-out images (pixels) on '
                   'which INT8 and FP32 must predict the same class')
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
    if args.int8:
        if args.batch != 1 or args.dynamic_batch or args.simplify:
            p.error('--int8 exports batch 1 without --dynamic-batch and '
                    '--simplify')
        if args.calib < 1 or args.auto_fp32 < 0 or not (
                0 <= args.min_agreement <= 1):
            p.error(f'--int8 needs --calib >= 1, --auto-fp32 >= 0 and '
                    f'--min-agreement in [0, 1], got {args.calib}, '
                    f'{args.auto_fp32}, {args.min_agreement}')
    elif args.fp32_nodes or args.auto_fp32:
        p.error('--fp32-nodes / --auto-fp32 need --int8')
    default = default_output_path(args.checkpoint)
    if args.int8:
        default = default[:-len('.onnx')] + '_int8.onnx'
    args.out = args.out or default
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
    if args.verify or args.benchmark or args.int8:
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


def _export_int8(model, args, shape, channels, label):
    """FP32 export (verified against PyTorch with --verify), calibration,
    quantization, INT8 verification; publishes ``args.out``."""
    fp32_check = {}

    def check(tmp):
        fp32_check.update(verify_onnx(model, tmp, (channels, *shape), [1],
                                      args.atol, args.rtol, args.providers))

    result = export_int8(
        model, args.out, shape, args.calib, args.calib_method,
        args.int8_target, args.fp32_nodes, args.auto_fp32, args.calib_split,
        verify=args.verify, min_agreement=args.min_agreement,
        in_channels=channels, opset=args.opset, force=args.force,
        providers=args.providers,
        before_quantize=check if args.verify else None)
    info, q = result['onnx'], result['int8']
    info.update(path=q['path'], size_bytes=q['size_bytes'])
    print(f'[{label}] exported INT8 {info["task"]} model to {args.out} '
          f'({q["size_bytes"] / 1e6:.2f} MB, {q["quantized_compute_nodes"]}'
          f'/{q["compute_nodes"]} compute nodes quantized, calibrated on '
          f'{q["calib_images"]} images with {q["method"]}'
          + (f', FP32 nodes {q["fp32_nodes"]}' if q['fp32_nodes'] else '')
          + ')')
    if fp32_check:
        print(f'[{label}] FP32 graph verified against PyTorch: max |ort - '
              f'torch| = {fp32_check["max_abs_diff"]:.3g}')
    v = result['verify']
    if v:
        print(f'[{label}] INT8 verified against FP32 on {v["images"]} '
              f'held-out images: prediction agreement '
              f'{v["argmax_agreement"]:.2%} (required '
              f'{v["min_agreement"]:.0%}), relative error '
              f'{v["relative_error"]:.3g}')
    return info, dict(fp32=fp32_check or None, int8=v) if args.verify \
        else None, q


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
    int8 = None
    if args.int8:
        info, verified, int8 = _export_int8(model, args, shape, channels,
                                            label)
    else:
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
        precision='int8' if args.int8 else 'fp32',
        int8=int8,
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
            IsADirectoryError, ImportError, ValueError, QuantizationError,
            DataConfigError, UnsupportedModelError) as exc:
        if os.environ.get('CPD_MM_TRACEBACK') == '1':  # as tools/train.py
            raise
        print(f'error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
