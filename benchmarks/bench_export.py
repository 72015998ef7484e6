"""Export benchmark: export time, peak memory, file sizes and FP16 / INT8 parity per backbone.

For each backbone (random weights, `--pretrained none`, 240 px) a short run is trained on the demo data
(4+4 shots, no augmentation, 1 epoch: the export cost does not depend on how well it is trained), then
`madclip-export RUN --out BUNDLE --fp16 --int8` runs as its own process: wall time and peak RSS are that
process's; the ONNX export step time, parity figures and file sizes come from its export_report.json.

    python benchmarks/bench_export.py                       # madclip-tiny, ViT-B-16, ViT-L-14-336
    python benchmarks/bench_export.py --backbones madclip-tiny

The bundles stay in benchmarks/work/bundles/ for bench_runtime.py. Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import WORK, demo_data, print_machine, run, table, tool, write_json


def prepare_run(data: Path, backbone: str, image_size: int) -> Path:
    out = WORK / "runs" / f"export-{backbone}"
    if not (out / "checkpoint.safetensors").is_file():
        run(
            [
                tool("madclip-train"),
                "--data",
                str(data),
                "--out",
                str(out),
                "--backbone",
                backbone,
                "--pretrained",
                "none",
                "--image-size",
                str(image_size),
                "--shots",
                "4",
                "--epochs",
                "1",
                "--no-augment",
                "--force",
            ]
        )
    return out


def export(run_dir: Path, backbone: str) -> dict:
    out = WORK / "bundles" / backbone
    m = run([tool("madclip-export"), str(run_dir), "--out", str(out), "--fp16", "--int8", "--force"])
    report = json.loads((out / "export_report.json").read_text())
    meta = json.loads((out / "metadata.json").read_text())
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {
        "backbone": backbone,
        "bundle": str(out),
        "wall_seconds": round(m.seconds, 1),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "onnx_export_seconds": report["export_seconds"],
        "files_bytes": files,
        "models": meta.get("models"),
        "variants": report["variants"],
        "calibration": report["calibration"],
        "golden_scores": golden_spread(out),
    }


def golden_spread(bundle: Path) -> dict:
    """Range of the FP32 reference scores on the golden set: how close together the flips are decided."""
    import numpy as np

    with np.load(bundle / "golden.npz") as g:
        score = g["score"].astype(np.float64)
    return {"score_min": float(score.min()), "score_max": float(score.max()), "score_std": float(score.std())}


def size(files: dict, name: str) -> float:
    """MB of a model file including its external-data sidecars."""
    return sum(v for k, v in files.items() if k == name or k.startswith(name + ".")) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="madclip-tiny,ViT-B-16,ViT-L-14-336")
    p.add_argument("--image-size", type=int, default=240)
    args = p.parse_args()
    print_machine()
    data = demo_data()
    results = []
    for backbone in args.backbones.split(","):
        results.append(export(prepare_run(data, backbone, args.image_size), backbone))

    rows = [
        [
            r["backbone"],
            r["onnx_export_seconds"],
            r["wall_seconds"],
            r["peak_rss_mb"],
            size(r["files_bytes"], "model.onnx"),
            size(r["files_bytes"], "model_fp16.onnx"),
            size(r["files_bytes"], "model_int8.onnx"),
            ", ".join(k for k in r["files_bytes"] if k.startswith("model.onnx.")),
        ]
        for r in results
    ]
    table(
        f"export at {args.image_size}px (--fp16 --int8, parity gates included in the wall time)",
        [
            "backbone",
            "ONNX export s",
            "madclip-export wall s",
            "peak RSS MB",
            "fp32 MB",
            "fp16 MB",
            "int8 MB",
            "external data",
        ],
        rows,
    )
    prow = []
    for r in results:
        v = r["variants"]
        fp32 = v["fp32"]["vs_pytorch"]
        prow.append(
            [r["backbone"], fp32["score"]["max_abs"], fp32["anomaly_map"]["p99_abs"]]
            + sum(
                (
                    [
                        v[k]["errors"]["score"]["max_abs"],
                        v[k]["errors"]["anomaly_map"]["p99_abs"],
                        v[k]["errors"]["anomaly_map"]["max_abs"],
                        v[k]["decision_flips"],
                        v[k]["auroc_change"],
                    ]
                    for k in ("fp16", "int8")
                ),
                [],
            )
            + [v["fp32"]["n_images"], r["golden_scores"]["score_std"]]
        )
    table(
        "parity on the golden set (fp32 vs PyTorch; fp16 / int8 vs the FP32 ONNX)",
        [
            "backbone",
            "fp32 score max",
            "fp32 map p99",
            "fp16 score max",
            "fp16 map p99",
            "fp16 map max",
            "fp16 flips",
            "fp16 dAUROC",
            "int8 score max",
            "int8 map p99",
            "int8 map max",
            "int8 flips",
            "int8 dAUROC",
            "golden n",
            "golden score std",
        ],
        prow,
    )
    write_json("export.json", {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
