"""madclip-export RUN --out BUNDLE [--fp16] [--int8] [--engine] [--triton] [--max-batch N] [--opset N]
[--calib DIR [--calib-split valid|test]] [--sign KEY]; and madclip-keygen (Ed25519 signing keys)."""

from __future__ import annotations

import argparse
import sys

from madclip_runtime.bundles.metadata_schema import OPSET_MAX, OPSET_MIN
from madclip_runtime.cli.common import ArgumentParser, bounded_int, err_console, run_cli, setup_logging
from madclip_runtime.contract import ANOMALY_MAP, FP32, OPENVINO, SCORE
from madclip_runtime.safe_text import escape_control

OPSET_DEFAULT = 18


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-export",
        description="Fold a trained madclip run into one ONNX graph "
        "(+ FP16 / INT8 variants, TensorRT engine) and write a verified bundle.",
    )
    p.add_argument("run", help="run directory written by madclip-train")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.add_argument(
        "--fp16", action="store_true", help="mixed-precision FP16 ONNX (+ TensorRT engine with a GPU)"
    )
    p.add_argument("--int8", action="store_true", help="dynamic INT8 ONNX for CPUs")
    p.add_argument(
        "--engine", action="store_true", help="require the TensorRT engine (fails without TensorRT + GPU)"
    )
    p.add_argument(
        "--triton", action="store_true", help="also write a Triton Inference Server model repository"
    )
    p.add_argument(
        "--max-batch",
        type=bounded_int(1, 4096),
        default=8,
        help="largest batch the graphs accept (default 8)",
    )
    p.add_argument(
        "--opset",
        type=bounded_int(OPSET_MIN, OPSET_MAX),
        default=OPSET_DEFAULT,
        help=f"ONNX opset to write ({OPSET_MIN}..{OPSET_MAX}, what the dynamo exporter writes; default {OPSET_DEFAULT})",
    )
    p.add_argument(
        "--data", help="dataset root, if it moved since training (for the parity/calibration images)"
    )
    p.add_argument(
        "--calib",
        metavar="DIR",
        help="calibration and golden images instead of the run's shots (needed for runs without shots, "
        "e.g. madclip-convert-reference): a dataset root (MVFA or normal/ + abnormal/) or a folder "
        "of images (unlabelled: no decision threshold)",
    )
    p.add_argument(
        "--calib-split",
        default="valid",
        choices=["valid", "test"],
        help="split of a --calib dataset root (default valid; the threshold is chosen on it, so never "
        "report results on the same split)",
    )
    p.add_argument(
        "--sign", metavar="KEY", help="sign metadata.json with this Ed25519 private key (PEM; madclip-keygen)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _report_table(report: dict):
    from rich.table import Table

    t = Table(title="madclip-export parity (golden set)")
    for col in ("variant", "reference", "score max", "map p99", "map max", "flips", "AUROC change"):
        t.add_column(col, justify="right" if col != "variant" else "left")
    ov_variants = {f"openvino {k}": v for k, v in (report.get(OPENVINO) or {}).get("variants", {}).items()}
    for name, v in {**report["variants"], **ov_variants}.items():
        ref = v.get("reference", "pytorch fp32")
        errs = v["vs_pytorch"] if name == FP32 else v["errors"]
        auc = v.get("auroc_change")
        t.add_row(
            name,
            ref,
            f"{errs[SCORE]['max_abs']:.2e}",
            f"{errs[ANOMALY_MAP]['p99_abs']:.2e}",
            f"{errs[ANOMALY_MAP]['max_abs']:.2e}",
            str(v.get("decision_flips")),
            "n/a" if auc is None else f"{auc:+.4f}",
        )
    return t


def _main(argv) -> int:
    args = parser().parse_args(argv)
    if args.engine and not args.fp16:
        args.fp16 = True  # the engine is built from the FP16 graph
    setup_logging(args.verbose)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .export import ExportOptions, export_bundle

    opts = ExportOptions(
        run=args.run,
        out=args.out,
        fp16=args.fp16,
        int8=args.int8,
        engine=args.engine,
        max_batch=args.max_batch,
        opset=args.opset,
        triton=args.triton,
        force=args.force,
        data=args.data,
        calib=args.calib,
        calib_split=args.calib_split,
        sign=args.sign,
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task("export", total=None)

        def step(text: str) -> None:
            progress.console.log(text)
            progress.update(task, description=text)

        report = export_bundle(opts, step)
    err_console.print(_report_table(report))
    trt = report.get("tensorrt")
    if trt and not trt.get("built"):
        err_console.print(escape_control(trt["reason"]), markup=False, highlight=False)
    sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(report["sizes_bytes"].items()))
    err_console.print(
        f"bundle written: {escape_control(args.out)}  ({sizes}; {report['seconds']:.0f} s)",
        style="green",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if report.get("calibration", {}).get("threshold") is None:
        err_console.print(
            "note: no decision threshold in this bundle (unlabelled calibration images): madclip-infer "
            "prints scores only unless given --threshold",
            markup=False,
            highlight=False,
        )
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: _main(sys.argv[1:] if argv is None else argv))


def keygen_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-keygen",
        description="Create an Ed25519 key pair for signing bundles "
        "(madclip-export --sign KEY.key; madclip-infer --trusted-key KEY.pub).",
    )
    p.add_argument("prefix", help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _keygen(argv) -> int:
    args = keygen_parser().parse_args(argv)
    setup_logging(args.verbose)
    from madclip_runtime.bundles.signing import generate_keypair

    kid = generate_keypair(f"{args.prefix}.key", f"{args.prefix}.pub")
    err_console.print(
        f"key {kid}: private {escape_control(args.prefix)}.key (keep it secret), public "
        f"{escape_control(args.prefix)}.pub (give it to madclip-infer --trusted-key)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def keygen_main(argv=None) -> int:
    return run_cli(lambda: _keygen(sys.argv[1:] if argv is None else argv))
