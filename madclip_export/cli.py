"""madclip-export RUN --out BUNDLE [--fp16] [--int8] [--engine] [--triton] [--max-batch N] [--opset N]."""
from __future__ import annotations

import argparse
import sys

from madclip_runtime.cli_common import err_console, run_cli, setup_logging


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="madclip-export", description="Fold a trained madclip run into one ONNX graph "
                                "(+ FP16 / INT8 variants, TensorRT engine) and write a verified bundle.")
    p.add_argument("run", help="run directory written by madclip-train")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument("--fp16", action="store_true", help="mixed-precision FP16 ONNX (+ TensorRT engine with a GPU)")
    p.add_argument("--int8", action="store_true", help="dynamic INT8 ONNX for CPUs")
    p.add_argument("--engine", action="store_true", help="require the TensorRT engine (fails without TensorRT + GPU)")
    p.add_argument("--triton", action="store_true", help="also write a Triton Inference Server model repository")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--data", help="dataset root, if it moved since training (for the parity/calibration images)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _report_table(report: dict):
    from rich.table import Table

    t = Table(title="madclip-export parity (golden set)")
    for col in ("variant", "reference", "score max", "map p99", "map max", "flips", "AUROC change"):
        t.add_column(col, justify="right" if col != "variant" else "left")
    for name, v in report["variants"].items():
        ref = v.get("reference", "pytorch fp32")
        errs = v["vs_pytorch"] if name == "fp32" else v["errors"]
        auc = v.get("auroc_change")
        t.add_row(name, ref, f"{errs['score']['max_abs']:.2e}", f"{errs['anomaly_map']['p99_abs']:.2e}",
                  f"{errs['anomaly_map']['max_abs']:.2e}", str(v.get("decision_flips")),
                  "n/a" if auc is None else f"{auc:+.4f}")
    return t


def _main(argv) -> int:
    args = parser().parse_args(argv)
    if args.engine and not args.fp16:
        args.fp16 = True  # the engine is built from the FP16 graph
    setup_logging(args.verbose)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .export import ExportOptions, export_bundle

    opts = ExportOptions(run=args.run, out=args.out, fp16=args.fp16, int8=args.int8, engine=args.engine,
                         max_batch=args.max_batch, opset=args.opset, triton=args.triton, force=args.force,
                         data=args.data)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  transient=True) as progress:
        task = progress.add_task("export", total=None)

        def step(text: str) -> None:
            progress.console.log(text)
            progress.update(task, description=text)

        report = export_bundle(opts, step)
    err_console.print(_report_table(report))
    trt = report.get("tensorrt")
    if trt and not trt.get("built"):
        err_console.print(trt["reason"], markup=False, highlight=False)
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(report["sizes_bytes"].items()))
    err_console.print(f"[green]bundle written:[/] {args.out}  ({sizes}; {report['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: _main(sys.argv[1:] if argv is None else argv))
