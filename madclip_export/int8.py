"""Dynamic INT8 ONNX for CPUs: signed 8-bit weights, activations quantised on the fly (onnxruntime)."""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .fp16 import head_nodes


def quantize_int8(fp32_path: str | Path, int8_path: str | Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Backbone and adapter MatMul/Gemm weights become s8. The score head (the dot products with the baked dt and
    # everything after them) stays FP32, like in the FP16 variant.
    graph = onnx.load(str(fp32_path), load_external_data=False)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per unquantised tensor
    try:
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=head_nodes(graph),
                         use_external_data_format=False)
    finally:
        root.setLevel(level)
