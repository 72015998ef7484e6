"""Runtime benchmark: `madclip-bench` (with its PyTorch-eager row) and the one-image `madclip-infer` cost.

For each backbone it uses the bundle and run left by bench_export.py in benchmarks/work/ (building them when
missing) and runs, each as its own process:

1. `madclip-bench --bundle B --json ...`: a row per available backend x precision, plus (benchmarks/pytorch_eager.py) PyTorch
   eager FP32 on the same weights, so the runtime / PyTorch ratio is measured side by side;
2. per precision, the wall time of `madclip-infer scan.png --bundle B --precision P` against the wall time of
   a process that only imports the runtime and loads the same model: the difference is what scoring one
   image adds to the model-load time.

    python benchmarks/bench_runtime.py                    # madclip-tiny and ViT-L-14-336
    python benchmarks/bench_runtime.py --backbones madclip-tiny --iters 50

Writes benchmarks/results/runtime.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _common import WORK, demo_data, print_machine, run, table, tool, write_json

LOAD_ONLY = (
    "import sys; from madclip_runtime import load; "
    "load(sys.argv[1], backend='ort-cpu', precision=sys.argv[2]).close()"
)


def bundle_for(backbone: str, image_size: int) -> tuple[Path, Path]:
    bundle, run_dir = WORK / "bundles" / backbone, WORK / "runs" / f"export-{backbone}"
    if not (bundle / "metadata.json").is_file():
        from bench_export import export, prepare_run

        run_dir = prepare_run(demo_data(), backbone, image_size)
        export(run_dir, backbone)
    return bundle, run_dir


def infer_overhead(bundle: Path, precision: str, image: Path, repeats: int) -> dict:
    """Median wall seconds of load-only vs load + score one image (fresh processes, ort-cpu)."""
    load, infer = [], []
    for _ in range(repeats):  # interleaved, so page-cache and clock drift hit both sides alike
        load.append(run([sys.executable, "-c", LOAD_ONLY, str(bundle), precision]).seconds)
        infer.append(
            run(
                [
                    tool("madclip-infer"),
                    str(image),
                    "--bundle",
                    str(bundle),
                    "--backend",
                    "ort-cpu",
                    "--precision",
                    precision,
                    "--json",
                ]
            )
        )
    result = json.loads(infer[-1].stdout.splitlines()[-1])
    load_s, infer_s = statistics.median(load), statistics.median(m.seconds for m in infer)
    return {
        "precision": precision,
        "load_only_wall_s": round(load_s, 3),
        "infer_one_wall_s": round(infer_s, 3),
        "added_s": round(infer_s - load_s, 3),
        "model_latency_ms": result["latency_ms"],
        "added_besides_model_s": round(infer_s - load_s - result["latency_ms"] / 1e3, 3),
        "infer_peak_rss_mb": round(max(m.peak_rss_mb for m in infer), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="madclip-tiny,ViT-L-14-336")
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--iters", type=int, default=0, help="timed runs per row (default: 50 tiny, 20 otherwise)")
    p.add_argument("--repeats", type=int, default=5, help="process launches per infer-overhead figure")
    args = p.parse_args()
    print_machine()
    image = demo_data() / "test" / "Ungood" / "img" / "test_abnormal_000.png"
    results = []
    for backbone in args.backbones.split(","):
        bundle, run_dir = bundle_for(backbone, args.image_size)
        iters = args.iters or (50 if backbone == "madclip-tiny" else 20)
        out_json = WORK / f"bench-{backbone}.json"
        m = run(
            [
                tool("madclip-bench"),
                "--bundle",
                str(bundle),
                "--iters",
                str(iters),
                "--warmup",
                "3",
                "--image",
                str(image),
                "--json",
                str(out_json),
            ]
        )
        print(m.stdout)
        bench = json.loads(out_json.read_text())
        torch_json = (
            WORK / f"bench-{backbone}-pytorch.json"
        )  # the PyTorch row, in its own process (torch-free runtime)
        batch = bench["settings"]["batch"]
        run(
            [
                sys.executable,
                str(Path(__file__).with_name("pytorch_eager.py")),
                "--run",
                str(run_dir),
                "--bundle",
                str(bundle),
                "--image",
                str(image),
                "--iters",
                str(iters),
                "--batch",
                str(batch),
                "--json",
                str(torch_json),
            ]
        )
        bench["rows"].append(json.loads(torch_json.read_text()))
        export_report = json.loads((bundle / "export_report.json").read_text())
        precisions = [
            r["precision"] for r in bench["rows"] if r["status"] == "ok" and r["backend"] == "ort-cpu"
        ]
        overhead = [infer_overhead(bundle, prec, image, args.repeats) for prec in precisions]
        results.append(
            {
                "backbone": backbone,
                "bench": bench,
                "infer_overhead": overhead,
                "export_parity": {
                    k: {
                        "decision_flips": v.get("decision_flips"),
                        "n_images": v["n_images"],
                        "errors": v["errors"],
                    }
                    for k, v in export_report["variants"].items()
                },
            }
        )

    rows = []
    for r in results:
        ok = {(x["backend"], x["precision"]): x for x in r["bench"]["rows"] if x["status"] == "ok"}
        torch_row = ok.get(("pytorch-eager", "fp32"))
        for (be, prec), x in ok.items():
            ratio = torch_row["latency_p50_ms"] / x["latency_p50_ms"] if torch_row else None
            flips = r["export_parity"].get(prec, {}).get("decision_flips") if be != "pytorch-eager" else None
            n = r["export_parity"]["fp32"]["n_images"]
            rows.append(
                [
                    r["backbone"],
                    be,
                    prec,
                    x["cold_start_s"],
                    x["latency_p50_ms"],
                    x["latency_p95_ms"],
                    x["throughput_ips"],
                    x["peak_rss_mb"],
                    f"{ratio:.2f}x" if ratio else None,
                    f"{flips}/{n}" if flips is not None and prec != "fp32" else None,
                ]
            )
    table(
        "runtime latency, batch 1 (p50/p95 ms, model only), throughput at max batch",
        [
            "backbone",
            "backend",
            "precision",
            "cold s",
            "p50 ms",
            "p95 ms",
            "img/s",
            "peak RSS MB",
            "speed vs PyTorch",
            "decision flips vs fp32",
        ],
        rows,
    )
    table(
        "madclip-infer on one image: what scoring adds to loading the model (fresh processes, medians)",
        [
            "backbone",
            "precision",
            "load-only process s",
            "infer process s",
            "added s",
            "model ms",
            "added besides the model s",
        ],
        [
            [
                r["backbone"],
                o["precision"],
                o["load_only_wall_s"],
                o["infer_one_wall_s"],
                o["added_s"],
                o["model_latency_ms"],
                o["added_besides_model_s"],
            ]
            for r in results
            for o in r["infer_overhead"]
        ],
    )
    write_json("runtime.json", {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
