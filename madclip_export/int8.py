"""Dynamic INT8 ONNX for CPUs: signed 8-bit weights, activations quantised on the fly (onnxruntime)."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .fp16 import head_nodes


def int8_excluded_nodes(graph: onnx.ModelProto, island_constants: tuple[str, ...]) -> list[str]:
    """The nodes dynamic quantisation leaves FP32: the method's FP32 tail (the consumers of its
    `fp32_island_constants` and everything downstream), as in the FP16 variant."""
    return head_nodes(graph, tuple(island_constants))


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, island_constants: tuple[str, ...]) -> None:
    """Backbone and adapter MatMul/Gemm weights become s8; the method's FP32 tail stays FP32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not island_constants:
        raise ValueError("INT8 quantisation needs the method's fp32_island_constants (its FP32 tail)")
    graph = onnx.load(str(fp32_path), load_external_data=False)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantiser logs one INFO line per unquantised tensor
    try:
        quantize_dynamic(
            str(fp32_path),
            str(int8_path),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=int8_excluded_nodes(graph, island_constants),
            use_external_data_format=False,
        )
    finally:
        root.setLevel(level)
