"""madclip_export: one ONNX graph (truncated frozen backbone + 8 adapters + baked dt + FP32 score head), FP16 and
INT8 variants, parity reports, TensorRT engines and the verified bundle."""
