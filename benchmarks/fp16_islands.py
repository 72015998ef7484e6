"""FP16 islands of the mixed-precision ONNX: the previous rule (Sigmoid, Erf and every Div kept FP32) against the
current one (only divisions by a computed norm; sigmoids/erf of the backbone in FP16), per bundle: Cast nodes,
FP32 node count, and parity with the FP32 graph on the bundle's golden inputs (onnxruntime CPU).

    python benchmarks/fp16_islands.py BUNDLE [BUNDLE ...]     # bundles exported with madclip-export

Writes benchmarks/results/fp16_islands.json and prints a table. CPU timings of FP16 graphs mean little (CPUs
have no fast FP16), so the cost is reported as Casts (each is a memory pass on the GPU), not milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from _common import print_machine, table, write_json

from madclip_runtime.bundles.bundle import Bundle

OLD_FP32_OPS = [
    "LayerNormalization",
    "ReduceL2",
    "ReduceMean",
    "ReduceMax",
    "ReduceSum",
    "ReduceSumSquare",
    "Sqrt",
    "Pow",
    "Sigmoid",
    "Resize",
    "Clip",
    "Div",
    "Expand",
    "Erf",
]


def convert(model: onnx.ModelProto, rule: str, islands: tuple[str, ...]) -> onnx.ModelProto:
    from madclip_export import fp16

    if rule == "current":
        return fp16.to_mixed_fp16(model, islands)
    saved = (fp16.FP32_OPS, fp16.computed_divisions)
    fp16.FP32_OPS, fp16.computed_divisions = OLD_FP32_OPS, (lambda m: [])
    try:
        return fp16.to_mixed_fp16(model, islands)
    finally:
        fp16.FP32_OPS, fp16.computed_divisions = saved


def run(model: onnx.ModelProto, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from madclip_runtime.engines.backends import session_options

    sess = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(True, True),
        providers=["CPUExecutionProvider"],
    )
    names = [o.name for o in sess.get_outputs()]
    outs = [sess.run(names, {"image": images[i : i + 1]}) for i in range(len(images))]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def bundles_with_reference(
    description: str,
) -> Iterator[tuple[Path, dict, onnx.ModelProto, np.ndarray, dict]]:
    """For each bundle named on the command line (after the machine line): its directory, metadata, FP32
    graph, golden images and the FP32 graph's outputs on them, the reference both FP16 benchmarks measure
    against."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("bundles", nargs="+")
    args = p.parse_args()
    print_machine()
    for b in map(Path, args.bundles):
        fp32 = onnx.load(str(b / "model.onnx"))
        meta = json.loads((b / "metadata.json").read_text())
        images = np.load(b / "golden.npz")["image"].astype(np.float32)
        yield b, meta, fp32, images, run(fp32, images)


def main() -> None:
    rows, results = [], []
    for b, meta, fp32, images, ref in bundles_with_reference(__doc__.splitlines()[0]):
        islands = Bundle(path=str(b), meta=meta, spec=None).fp32_islands  # the method's FP32-tail constants
        for rule in ("previous", "current"):
            g = convert(fp32, rule, islands)
            casts = sum(n.op_type == "Cast" for n in g.graph.node)
            out = run(g, images)
            score_err = float(np.abs(out["score"] - ref["score"]).max())
            map_err = float(np.percentile(np.abs(out["anomaly_map"] - ref["anomaly_map"]), 99))
            rec = {
                "bundle": str(b),
                "rule": rule,
                "casts": casts,
                "nodes": len(g.graph.node),
                "score_max_abs_err": score_err,
                "map_p99_abs_err": map_err,
            }
            results.append(rec)
            rows.append([b.name, rule, casts, len(g.graph.node), f"{score_err:.2e}", f"{map_err:.2e}"])
    table(
        "mixed-precision ONNX: previous vs current FP32 islands",
        ["bundle", "rule", "Cast nodes", "nodes", "score max |err| vs FP32", "map p99 |err| vs FP32"],
        rows,
    )
    write_json("fp16_islands.json", {"results": results})


if __name__ == "__main__":
    sys.exit(main())
