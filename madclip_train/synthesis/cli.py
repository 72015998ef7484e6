"""madclip-synth: write synthetic anomalies of a user's normal scans and a preview grid, before training."""

from __future__ import annotations

import argparse
import json
import logging
import os

from madclip_runtime.cli.common import err_console, run_cli, setup_logging
from madclip_runtime.errors import MadclipError

log = logging.getLogger("madclip_train.synthesis")


def parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    p = argparse.ArgumentParser(
        prog="madclip-synth",
        description="Synthesise anomalies on normal scans as "
        "MediCLIP training does, and write the samples and a preview grid.",
    )
    p.add_argument(
        "--data",
        required=True,
        help="dataset root (MVFA/BMAD: uses valid/good/img; plain: ROOT/normal) or a folder of normal scans",
    )
    p.add_argument(
        "--out", required=True, help="output folder (created; holds preview.png, samples/, samples.json)"
    )
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument(
        "--seed", type=int, default=111, help="shot choice and synthesis seed (default 111, as training)"
    )
    p.add_argument(
        "--shots", type=int, default=16, help="normal shots to use (default 16, or all when fewer)"
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="NAME[=P]",
        help=f"task mixture, e.g. 'cutpaste=0.5 gauss' (known: {', '.join(TASKS)}); default: the "
        "reference's cutpaste, gauss, source, identity at 0.25 each",
    )
    p.add_argument("--image-size", type=int, default=224, help="side of the synthesised images (default 224)")
    p.add_argument("--columns", type=int, default=4, help="tile pairs per preview row (default 4)")
    p.add_argument("--tile", type=int, default=224, help="preview tile side in pixels (default 224)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    import numpy as np
    from PIL import Image

    from madclip_runtime.atomic import AtomicDirectory, atomic_save_png, atomic_write_text

    from . import io
    from .preview import preview_grid
    from .synthesizer import Synthesizer, format_mix, parse_mix

    if args.n < 1:
        raise MadclipError(f"-n must be at least 1, got {args.n}")
    if args.image_size < 16 or args.tile < 32 or args.columns < 1:
        raise MadclipError("--image-size must be >= 16, --tile >= 32, --columns >= 1")
    mix = parse_mix(args.tasks)
    paths = io.list_normals(args.data)
    k = io.usable_shots(paths, args.shots)
    shots_p = io.pick_shots(paths, k, args.seed)
    shots = list(io.load_normals(shots_p, args.image_size))
    synth = Synthesizer(shots, mix)
    from rich.progress import Progress

    samples, records = [], []
    with AtomicDirectory(args.out, force=args.force) as tmp:
        os.makedirs(os.path.join(tmp, "samples"))
        with Progress(console=err_console, transient=True) as progress:
            bar = progress.add_task("synthesising", total=args.n)
            for i in range(args.n):
                index, epoch = i % k, i // k  # what training sees: shot `index` in epoch `epoch`
                s = synth.seeded(index, args.seed, epoch)
                stem = f"{i:03d}_{s.task}"
                atomic_save_png(os.path.join(tmp, "samples", stem + ".png"), Image.fromarray(s.image))
                mask8 = np.round(np.clip(s.label, 0, 1) * 255).astype(np.uint8)
                atomic_save_png(os.path.join(tmp, "samples", stem + "_mask.png"), Image.fromarray(mask8))
                samples.append(s)
                records.append(
                    {
                        "image": f"samples/{stem}.png",
                        "mask": f"samples/{stem}_mask.png",
                        "task": s.task,
                        "anomalies": s.rounds,
                        "labelled_fraction": round(float(np.mean(s.label > 0)), 6),
                        "source": str(shots_p[index]),
                        "shot_index": index,
                        "epoch": epoch,
                    }
                )
                progress.advance(bar)
        names = [os.path.basename(str(shots_p[s.shot])) for s in samples]
        grid = preview_grid(samples, [shots[s.shot] for s in samples], names, args.columns, args.tile)
        atomic_save_png(os.path.join(tmp, "preview.png"), grid, optimize=True)
        doc = {
            "data": os.path.abspath(args.data),
            "seed": args.seed,
            "image_size": args.image_size,
            "tasks": format_mix(mix),
            "shots": [str(p) for p in shots_p],
            "samples": records,
            "mask_encoding": "8-bit PNG, label = v / 255 (labels in [0, 1])",
        }
        atomic_write_text(os.path.join(tmp, "samples.json"), json.dumps(doc, indent=2) + "\n")
    err_console.print(f"[green]wrote[/] {args.n} samples and {os.path.join(args.out, 'preview.png')}")
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: _main(argv))
