"""madclip-train, madclip-eval and madclip-convert-reference."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from madclip_runtime.cli.common import (
    ArgumentParser,
    bounded_int,
    err_console,
    finite_float,
    run_cli,
    setup_logging,
)
from madclip_runtime.contract import BF16, FP16, FP32
from madclip_runtime.safe_text import escape_control

log = logging.getLogger("madclip_train")


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def train_parser() -> argparse.ArgumentParser:
    from .methods import DEFAULT_METHOD, all_methods, get_method, method_names

    default = get_method(DEFAULT_METHOD)
    normal_only = ", ".join(f"--method {m.name}" for m in all_methods() if not m.needs_abnormal)
    p = ArgumentParser(
        prog="madclip-train",
        description=f"Learn a few-shot anomaly-detection method ({default.title} "
        "by default) from the shots of a dataset's valid/ split and write a run directory. "
        "Options left unset take the method's reference value.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="dataset root (MVFA layout ROOT/valid/good/img ..., or plain "
        "ROOT/normal, ROOT/abnormal, ROOT/masks)",
    )
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=method_names(),
        help=f"the method to train (default {DEFAULT_METHOD})",
    )
    p.add_argument(
        "--shots",
        type=bounded_int(1, 10_000),
        help=f"k normal + k abnormal shots (default 16; {normal_only}: k normal only, all of them "
        f"when the folder has fewer, like madclip-synth)",
    )
    p.add_argument(
        "--seed",
        type=bounded_int(0, 2**63 - 1),
        help="shot sampling, initialisation, batch order, jitter (default 111)",
    )
    p.add_argument(
        "--shot-list", help="shot-list file (lines 'a-0: name ...' and 'n-0: name ...'); overrides --shots"
    )
    p.add_argument(
        "--objective", help="[Objective] word (default: from the dataset folder name, else 'medical image')"
    )
    p.add_argument("--backbone", help="open_clip model name, or madclip-tiny (default: the method's)")
    p.add_argument(
        "--pretrained", help="openai | PATH to weights | none (random, pipeline checks); default openai"
    )
    p.add_argument("--image-size", type=bounded_int(28, 4096), help="input size (default: the method's)")
    p.add_argument("--epochs", type=bounded_int(1, 100_000), help="default: the method's")
    p.add_argument("--batch-size", type=bounded_int(1, 65_536), help="default: the method's")
    p.add_argument(
        "--lr",
        type=finite_float(0.0, 10.0, min_open=True),
        help="Adam learning rate (default: the method's, 1e-3)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--precision",
        choices=["auto", FP32, FP16, BF16],
        help="autocast precision of training (default auto: fp16 on CUDA, the reference's choice, with a "
        "gradient scaler; fp32 on the CPU); bf16 is fast on CPUs with AMX/AVX512-BF16. "
        "The checkpoint is always FP32.",
    )
    p.add_argument(
        "--select-on",
        choices=["none", "valid"],
        help="none: fixed epoch budget, keep the last epoch (default); valid: hold out part of the shots "
        "and keep the epoch with the lowest held-out loss. The test split is never used.",
    )
    p.add_argument(
        "--holdout-fraction",
        type=finite_float(0.0, 1.0, min_open=True, max_open=True),
        help="share of the shots held out by --select-on valid (0.25)",
    )
    p.add_argument(
        "--feature-cache",
        choices=["memory", "disk", "off"],
        help="compute the cacheable features once (memory, the default; disk) or every step (off)",
    )
    p.add_argument(
        "--cache-dir", help="directory of the disk feature cache (default ~/.cache/madclip/features)"
    )
    p.add_argument("--no-augment", action="store_true", help="skip the method's offline augmentation")
    p.add_argument(
        "--augment-variant",
        choices=["reference", "exact"],
        help="reference (default): the authors' zoom crop int(S/scale) and colour jitter (per-column mean, "
        "one factor pair per class of shots); exact: exact affine zooms, per-image jitter",
    )
    p.add_argument(
        "--quick-gelu",
        action="store_const",
        const=True,
        help="QuickGELU (what OpenAI trained with; default: the method's reference)",
    )
    p.add_argument(
        "--causal-prompt-mask",
        action="store_const",
        const=True,
        help="encode the learnable prompts with CLIP's causal mask (the reference omits it)",
    )
    p.add_argument(
        "--normalize",
        choices=["none", "clip"],
        help="input normalisation: none or CLIP mean/std (default: the method's reference)",
    )
    p.add_argument(
        "--init-seed",
        type=bounded_int(0, 2**63 - 1),
        help="seed of the random backbone when --pretrained none (0)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method switch (repeatable; booleans true/false, yes/no, 1/0, on/off): "
        + "; ".join(
            f"--method {m.name}: {', '.join(m.option_schema.options)}"
            for m in all_methods()
            if m.option_schema.options
        ),
    )
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.add_argument("-v", "--verbose", action="store_true")
    for method in all_methods():  # each method's own flags, from its option schema
        method.option_schema.add_flags(p, method.title)
    return p


def method_options(args: argparse.Namespace) -> dict:
    """`--option KEY=VALUE` items and the method's own flags -> {key: typed value}, checked by the method's
    option schema; another method's flags are refused."""
    from madclip_runtime.errors import MadclipError

    from .methods import all_methods, get_method

    for other in all_methods():
        if other.name != args.method and other.option_schema.from_flags(args):
            raise MadclipError(
                f"{' and '.join(other.option_schema.flags())} apply to --method {other.name} only"
            )
    schema = get_method(args.method).option_schema
    return {**schema.parse_items(args.option), **schema.from_flags(args)}


def _train(argv) -> int:
    args = train_parser().parse_args(argv)
    setup_logging(args.verbose)
    from .run import TrainRequest, train_run

    req = TrainRequest(
        data=args.data,
        out=args.out,
        method=args.method,
        shots=args.shots,
        seed=args.seed,
        shot_list=args.shot_list,
        objective=args.objective,
        backbone=args.backbone,
        pretrained=args.pretrained,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        select_on=args.select_on,
        holdout_fraction=args.holdout_fraction,
        feature_cache=args.feature_cache,
        cache_dir=args.cache_dir,
        augment=False if args.no_augment else None,
        augment_variant=args.augment_variant,
        quick_gelu=args.quick_gelu,
        causal_prompt_mask=args.causal_prompt_mask,
        normalize=args.normalize,
        init_seed=args.init_seed,
        force=args.force,
        precision=args.precision,
        options=method_options(args),
    )
    with _progress() as progress:
        summary = train_run(req, progress=progress)
    err_console.print(
        f"run written: {escape_control(summary['run_dir'])}  ({summary['n_train_images']} training images, "
        f"epoch {summary['selected_epoch']} kept, {summary['seconds']:.1f} s)",
        style="green",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def train_main(argv=None) -> int:
    return run_cli(lambda: _train(sys.argv[1:] if argv is None else argv))


def eval_parser() -> argparse.ArgumentParser:
    from .methods import all_methods

    transductive = ", ".join(m.title for m in all_methods() if m.supports_transductive)
    p = ArgumentParser(prog="madclip-eval", description="Score a dataset split with a trained run.")
    p.add_argument("run", help="run directory written by madclip-train")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--split", default="test")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.add_argument("--batch-size", type=bounded_int(1, 65_536), default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--transductive",
        action="store_true",
        help=f"{transductive}: normalise with the test set's min/max, as the reference does (for comparing "
        "with the paper; a deployed model uses the fixed normalisers of the run)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _eval(argv) -> int:
    args = eval_parser().parse_args(argv)
    setup_logging(args.verbose)
    from rich.table import Table

    from madclip_runtime.atomic import atomic_write_text

    from .data import load_split
    from .evaluate import metrics_from_predictions, predict_split
    from .rundir import load_run
    from .train import resolve_device

    device = resolve_device(args.device)
    split = load_split(args.data, args.split)
    model, _ = load_run(args.run, device)
    t0 = time.perf_counter()
    if args.transductive and not model.supports_transductive:
        from madclip_runtime.errors import MadclipError

        from .methods import all_methods

        titles = ", ".join(m.title for m in all_methods() if m.supports_transductive)
        raise MadclipError(
            f"{args.run}: --transductive applies to {titles} runs only (this run is {model.name!r})"
        )
    with _progress() as progress:
        if args.transductive:
            pred = model.predict_transductive(split, args.batch_size, device, progress)
        else:
            pred = predict_split(model, split, args.batch_size, device, progress)
    metrics = metrics_from_predictions(pred)
    metrics["normalisation"] = (
        "transductive (test-set min-max)" if args.transductive else "fixed (from the run)"
    )
    metrics.update(
        {
            "split": args.split,
            "data": str(args.data),
            "run": str(args.run),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    from rich.markup import escape

    table = Table(title=escape(escape_control(f"madclip-eval {args.run} on {args.data}/{args.split}")))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("image_auroc", "image_auroc_max_map", "pixel_auroc", "aupro", "f1_max", "n_images"):
        v = metrics[k]
        table.add_row(k, "n/a" if v is None else (str(v) if isinstance(v, int) else f"{100 * v:.2f} %"))
    from rich.console import Console

    Console().print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(metrics, indent=2) + "\n")
    return 0


def eval_main(argv=None) -> int:
    return run_cli(lambda: _eval(sys.argv[1:] if argv is None else argv))


def convert_parser() -> argparse.ArgumentParser:
    from .methods import DEFAULT_METHOD, all_methods, method_names

    no_objective = ", ".join(m.title for m in all_methods() if not m.uses_objective)
    with_shots = ", ".join(m.title for m in all_methods() if m.reference_needs_shots)
    p = ArgumentParser(
        prog="madclip-convert-reference",
        description="Convert an authors' released checkpoint (loaded with weights_only=True: "
        "no code is executed) into a madclip run directory.",
    )
    p.add_argument("checkpoint", help="the released .pth file")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=method_names(),
        help=f"which method's checkpoint it is (default {DEFAULT_METHOD})",
    )
    p.add_argument(
        "--objective",
        help=f"[Objective] word the checkpoint was trained with, e.g. Brain (not used by: "
        f"{no_objective or 'none'})",
    )
    p.add_argument("--backbone", help="default: the method's")
    p.add_argument("--pretrained", help="openai (default) | PATH to weights")
    p.add_argument("--image-size", type=bounded_int(28, 4096), help="default: the method's")
    p.add_argument(
        "--data",
        help=f"{with_shots}: dataset root whose valid/ shots rebuild what the release lacks "
        "(e.g. a memory bank)",
    )
    p.add_argument(
        "--shot-list", help=f"{with_shots}: the authors' shot list (e.g. fewshot_seed/Brain/4-shot.txt)"
    )
    p.add_argument(
        "--shots",
        type=bounded_int(1, 10_000),
        default=4,
        help=f"{with_shots} without --shot-list: k shots sampled with --seed (4)",
    )
    p.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=111)
    p.add_argument("--force", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _convert(argv) -> int:
    args = convert_parser().parse_args(argv)
    setup_logging(args.verbose)
    from madclip_runtime.errors import MadclipError

    from .config import DEFAULT_OBJECTIVE
    from .methods import get_method
    from .reference import convert_reference_run
    from .run import TrainRequest, resolve_configs

    req = TrainRequest(
        data="",
        out=args.out,
        method=args.method,
        backbone=args.backbone,
        pretrained=args.pretrained,
        image_size=args.image_size,
    )
    if args.objective is None and get_method(args.method).uses_objective:
        raise MadclipError(
            f"--objective is required for --method {args.method} (the word its prompts were trained with)"
        )
    mcfg, _ = resolve_configs(req, args.objective or DEFAULT_OBJECTIVE)
    out = convert_reference_run(
        args.checkpoint,
        args.out,
        mcfg,
        force=args.force,
        data=args.data,
        shot_list=args.shot_list,
        shots=args.shots,
        seed=args.seed,
    )
    err_console.print(
        f"run written: {escape_control(out)}", style="green", markup=False, highlight=False, soft_wrap=True
    )
    return 0


def convert_main(argv=None) -> int:
    return run_cli(lambda: _convert(sys.argv[1:] if argv is None else argv))
