"""Deployment: ONNX export of (pruned) models in FP32 or INT8
(:mod:`.int8`, :mod:`.quantize`), verification, timing, evaluation of an
exported graph on the val set (:mod:`.onnx_eval`), and the measured
per-layer latency table (:mod:`.latency_table`), in either precision.

``tools/export_onnx.py`` is the command-line front end. onnx and onnxruntime
are imported only when a function needs them.
"""
from .atomic import atomic_output, check_output_path
from .benchmark import (benchmark_session, benchmark_sessions, create_session,
                        latency_stats, select_providers)
from .complexity import count_flops, inference_params, model_complexity
from .onnx_export import DEFAULT_OPSET, default_output_path, export_onnx
from .latency_table import LatencyTable
from .int8 import calibration_images, export_int8, verify_int8
from .onnx_eval import evaluate_onnx
from .quantize import (QuantizationError, quantization_summary,
                       quantize_onnx)
from .report import (comparison, comparison_table, latency_summary,
                     write_json)
from .verify import (DEFAULT_ATOL, DEFAULT_RTOL, VerificationError,
                     verify_onnx)
from .wrappers import (CLASSIFICATION, DETECTION, SEGMENTATION,
                       default_input_shape, export_module, input_channels,
                       model_task)

__all__ = [
    'atomic_output', 'check_output_path', 'benchmark_session',
    'benchmark_sessions',
    'create_session', 'latency_stats', 'select_providers', 'count_flops',
    'inference_params', 'model_complexity', 'DEFAULT_OPSET',
    'default_output_path', 'export_onnx', 'comparison', 'comparison_table',
    'latency_summary', 'LatencyTable', 'write_json', 'DEFAULT_ATOL',
    'DEFAULT_RTOL',
    'VerificationError', 'verify_onnx', 'CLASSIFICATION', 'SEGMENTATION',
    'DETECTION',
    'default_input_shape', 'export_module', 'input_channels', 'model_task',
    'calibration_images', 'export_int8', 'verify_int8', 'evaluate_onnx',
    'QuantizationError', 'quantization_summary', 'quantize_onnx'
]
