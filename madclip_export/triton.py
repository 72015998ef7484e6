"""A Triton Inference Server model repository for the bundle's ONNX model (onnxruntime backend).

    BUNDLE/triton/madclip/config.pbtxt
    BUNDLE/triton/madclip/1/model.onnx  (+ model.onnx.data)

Outputs that are batch-only tensors ([B]) are declared `dims: [ 1 ]` with `reshape: { shape: [ ] }`, Triton's
documented way to describe a model output that has no dimensions besides the batch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from madclip_runtime.contract import ANOMALY_MAP, INPUT_NAME, SCORE, SCORE_MAP_MAX


def config_pbtxt(name: str, image_size: int, max_batch: int, instance_kind: str = "KIND_AUTO") -> str:
    s = int(image_size)
    preferred = sorted({b for b in (max(1, max_batch // 2), max_batch) if b >= 1})
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {int(max_batch)}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ 3, {s}, {s} ]
  }}
]
output [
  {{
    name: "{SCORE}"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "{ANOMALY_MAP}"
    data_type: TYPE_FP32
    dims: [ 1, {s}, {s} ]
  }},
  {{
    name: "{SCORE_MAP_MAX}"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: 2000
}}
instance_group [
  {{
    count: 1
    kind: {instance_kind}
  }}
]
"""


def write_triton_repository(
    bundle_dir: str | os.PathLike,
    model_files: list[str],
    image_size: int,
    max_batch: int,
    name: str = "madclip",
) -> Path:
    """Copy the FP32 ONNX model (and its external data) into a Triton repository inside the bundle."""
    repo = Path(bundle_dir) / "triton" / name
    (repo / "1").mkdir(parents=True, exist_ok=True)
    for (
        f
    ) in model_files:  # "model.onnx" and optionally "model.onnx.data": names kept, the graph refers to them
        src = Path(bundle_dir) / f
        dst = repo / "1" / f
        try:
            os.link(src, dst)  # same filesystem: no extra space
        except OSError:
            shutil.copy2(src, dst)
    (repo / "config.pbtxt").write_text(config_pbtxt(name, image_size, max_batch))
    return repo
