"""FP16 outputs (issue 20 item 8): is the FP16 bundle's map rounded to FP16 on the way out?

For each bundle: the map of its `model_fp16.onnx` (as exported) and of the current exporter's conversion of
its `model.onnx`, against the FP32 graph, on the bundle's golden inputs (onnxruntime CPU, the runtime's FP16
session options): distinct values of the first golden map, the share of map values that are exactly FP16
numbers (1.0: the output went through FP16), max abs error of map and score.

    python benchmarks/fp16_outputs.py BUNDLE [BUNDLE ...]

Writes benchmarks/results/fp16_outputs.json and prints a table.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from _common import table, write_json
from fp16_islands import bundles_with_reference, run


def measure(model: onnx.ModelProto, images: np.ndarray, ref: dict) -> dict:
    out = run(model, images)
    amap = out["anomaly_map"]
    return {
        "distinct_values_first_map": int(len(np.unique(amap[0]))),
        "share_on_fp16_grid": float(np.mean(amap == amap.astype(np.float16).astype(np.float32))),
        "map_max_abs_err": float(np.abs(amap - ref["anomaly_map"]).max()),
        "score_max_abs_err": float(np.abs(out["score"] - ref["score"]).max()),
    }


def main() -> None:
    from madclip_export.fp16 import to_mixed_fp16

    rows, results = [], []
    for b, meta, fp32, images, ref in bundles_with_reference(__doc__.splitlines()[0]):
        variants = {
            "bundle's model_fp16.onnx": onnx.load(str(b / "model_fp16.onnx")),
            "current exporter": to_mixed_fp16(fp32, tuple(meta["fp32_islands"])),
        }
        for name, graph in variants.items():
            rec = {
                "bundle": str(b),
                "method": meta.get("method"),
                "graph": name,
                **measure(graph, images, ref),
                "fp32_distinct_values_first_map": int(len(np.unique(ref["anomaly_map"][0]))),
            }
            results.append(rec)
            rows.append(
                [
                    b.name,
                    rec["method"],
                    name,
                    f"{rec['distinct_values_first_map']} / {rec['fp32_distinct_values_first_map']}",
                    f"{rec['share_on_fp16_grid']:.3f}",
                    f"{rec['map_max_abs_err']:.2e}",
                    f"{rec['score_max_abs_err']:.2e}",
                ]
            )
    table(
        "FP16 map vs the FP32 graph (golden inputs)",
        [
            "bundle",
            "method",
            "FP16 graph",
            "distinct values (FP16 / FP32)",
            "share on FP16 grid",
            "map max |err|",
            "score max |err|",
        ],
        rows,
    )
    write_json("fp16_outputs.json", {"results": results})


if __name__ == "__main__":
    sys.exit(main())
