"""INT8 and the method's FP32 tail: the previous rule (only MadCLIP's `dt` consumers and downstream kept out
of quantisation, for every method) against the current one (the method's own `fp32_island_constants`), per
bundle: quantised MatMul/Gemm count, nodes kept FP32, and the INT8 graph's error against the FP32 graph on the
bundle's golden inputs (onnxruntime CPU, both rules in one run).

    python benchmarks/int8_islands.py BUNDLE [BUNDLE ...]     # bundles exported with madclip-export
    python benchmarks/int8_islands.py --tiny        # tiny runs of every registered method (madclip-tiny)

Writes benchmarks/results/int8_islands.json and prints a table. FP32 and FP16 graphs do not depend on the
rule.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from _common import WORK, print_machine, run, table, tool, write_json

from madclip_runtime.bundles.bundle import Bundle
from madclip_runtime.contract import (
    ANOMALY_MAP,
    FP32,
    GOLDEN_FILE,
    GOLDEN_INPUT,
    METADATA_FILE,
    MODEL_FILES,
    SCORE,
)

PREVIOUS = ("dt",)  # the default the quantiser used for every method before issue 22


def tiny_bundles(work: Path) -> list[Path]:
    """A tiny run of every registered method (madclip-tiny, random weights, generated data), exported."""
    from madclip_train.methods import method_names

    data = work / "data"
    if not (data / "Brain_AD").is_dir():
        run([tool("madclip-demo-data"), "--out", str(data), "--n-valid", "4", "--n-test", "8", "--seed", "5"])
    out = []
    for method in method_names():
        r, b = work / f"run-{method}", work / f"bundle-{method}"
        if not (r / "config.json").is_file():
            run(
                [
                    tool("madclip-train"),
                    "--method",
                    method,
                    "--data",
                    str(data / "Brain_AD"),
                    "--out",
                    str(r),
                    "--shots",
                    "3",
                    "--epochs",
                    "2",
                    "--seed",
                    "7",
                    "--backbone",
                    "madclip-tiny",
                    "--pretrained",
                    "none",
                    "--device",
                    "cpu",
                    "--precision",
                    "fp32",
                ]
            )
        if not (b / METADATA_FILE).is_file():
            run([tool("madclip-export"), str(r), "--out", str(b), "--max-batch", "4", "--force"])
        out.append(b)
    return out


def ort_run(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = [sess.run(names, {sess.get_inputs()[0].name: images[i : i + 1]}) for i in range(len(images))]
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def measure(bundle: Path, tmp: Path) -> list[dict]:
    from madclip_export.int8 import int8_excluded_nodes, quantize_int8

    meta = json.loads((bundle / METADATA_FILE).read_text())
    islands = Bundle(path=str(bundle), meta=meta, spec=None).fp32_islands
    fp32_path = bundle / MODEL_FILES[FP32]
    graph = onnx.load(str(fp32_path), load_external_data=False)
    images = np.load(bundle / GOLDEN_FILE)[GOLDEN_INPUT].astype(np.float32)
    ref = ort_run(fp32_path, images)
    recs = []
    for rule, constants in (("previous (dt)", PREVIOUS), ("current (method's)", islands)):
        path = tmp / f"{bundle.name}-{len(recs)}.onnx"
        quantize_int8(fp32_path, path, constants)
        q = onnx.load(str(path))
        got = ort_run(path, images)
        err_s = np.abs(got[SCORE].astype(np.float64) - ref[SCORE])
        err_m = np.abs(got[ANOMALY_MAP].astype(np.float64) - ref[ANOMALY_MAP])
        recs.append(
            {
                "bundle": str(bundle),
                "method": meta.get("method", "madclip"),
                "rule": rule,
                "constants": list(constants),
                "kept_fp32": len(int8_excluded_nodes(graph, constants)),
                "quantised_matmuls": sum(
                    n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in q.graph.node
                ),
                "score_max_abs_err": float(err_s.max()),
                "map_p99_abs_err": float(np.percentile(err_m, 99)),
                "map_max_abs_err": float(err_m.max()),
                "n_images": int(len(images)),
                "bytes": path.stat().st_size,
            }
        )
    return recs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="*")
    p.add_argument(
        "--tiny", action="store_true", help="make tiny runs and bundles of every registered method"
    )
    args = p.parse_args()
    if not args.bundles and not args.tiny:
        p.error("give bundles or --tiny")
    print_machine()
    bundles = [Path(b) for b in args.bundles] + (tiny_bundles(WORK / "int8_islands") if args.tiny else [])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in bundles:
            results += measure(b, Path(tmp))
    table(
        "dynamic INT8: nodes kept out of quantisation, previous vs current rule (error vs the FP32 graph)",
        [
            "method",
            "rule",
            "kept FP32",
            "quantised MatMuls",
            "score max |err|",
            "map p99 |err|",
            "map max |err|",
        ],
        [
            [
                r["method"],
                r["rule"],
                r["kept_fp32"],
                r["quantised_matmuls"],
                f"{r['score_max_abs_err']:.2e}",
                f"{r['map_p99_abs_err']:.2e}",
                f"{r['map_max_abs_err']:.2e}",
            ]
            for r in results
        ],
    )
    write_json("int8_islands.json", {"results": results})


if __name__ == "__main__":
    sys.exit(main())
