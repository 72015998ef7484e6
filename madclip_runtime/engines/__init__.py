"""Inference backends: onnxruntime (CPU, CUDA, TensorRT EP) and native TensorRT (rules, builder, runner)."""
