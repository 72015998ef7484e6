"""One protocol for every method: train, evaluate and export each method on the same data, shots and seed.

For every `<Obj>_AD` dataset under --root, every k in --shots and every method in METHODS, this runs the
project's own CLIs (so the numbers are what a user gets):

    madclip-train --method M --data ROOT/<Obj>_AD --shots k --seed S [--shot-list LISTS/<Obj>/<k>-shot.txt]
    madclip-eval RUN --data ... --json eval.json         (+ the method's extra evaluation modes, e.g. MVFA's
                                                           --transductive, the reference's test-set min-max)
    madclip-export RUN --out BUNDLE                       (FP32 ONNX, parity gate included)

then times CPU inference of the bundle (onnxruntime, batch 1, median) and prints one table (image AUROC,
pixel AUROC, AUPRO, train time, export size, CPU latency) plus the papers' layout (AC / AS per dataset and the
averages) beside the published numbers. Every finished cell is stored as WORK/<dataset>/k<k>/<method>/result.json
and skipped on the next run (resumable; --force recomputes).

Shot lists in the authors' format (lines `n-0: ...` / `a-0: ...`) are taken from --shot-lists
(<folder>/<Obj>/<k>-shot.txt, e.g. MVFA-AD's dataset/fewshot_seed) when given, so both methods see the
exact published shots; otherwise each run samples k + k shots with --seed.

A further method is one more `Method(...)` entry in METHODS.

    python benchmarks/compare_methods.py --root data/ --shots 2 4 8 16 --shot-lists MVFA-AD/dataset/fewshot_seed
    python benchmarks/compare_methods.py --root ../shared/data/realscans --shots 2 --backbone madclip-tiny \
        --pretrained none --epochs 1        # pipeline check on random weights (numbers meaningless)

Writes benchmarks/results/compare_methods.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import WORK, console, print_machine, run, table, tool, write_json


@dataclass(frozen=True)
class Method:
    name: str  # the --method value
    train_args: tuple[str, ...] = ()  # extra madclip-train arguments
    eval_modes: dict = field(
        default_factory=lambda: {"inductive": ()}
    )  # mode -> extra madclip-eval arguments
    paper_mode: str = "inductive"  # the mode comparable with the method's published numbers
    shot_lists: bool = (
        True  # takes the authors' k-normal + k-abnormal shot lists (normal-only methods do not)
    )


METHODS = [
    Method("madclip"),
    Method(
        "mvfa", eval_modes={"inductive": (), "transductive": ("--transductive",)}, paper_mode="transductive"
    ),
    # MediCLIP trains on the k normal shots only (anomalies synthesised); evaluated on the same test split
    Method("mediclip", shot_lists=False),
    # APRIL-GAN: linear layers trained on the k + k shots (masks where the dataset has them), bank of the k normal
    # shots; the paper's image score min-maxes over the test set (--transductive)
    Method(
        "aprilgan",
        eval_modes={"inductive": (), "transductive": ("--transductive",)},
        paper_mode="transductive",
    ),
]

# Published AUC % (AC image, AS pixel; None = not reported), keyed by our short dataset names.
SHORT = {
    "Histopathology": "HIS",
    "Chest": "Chest",
    "Retina_OCT2017": "OCT17",
    "Brain": "BrainMRI",
    "Liver": "LiverCT",
    "Retina_RESC": "RESC",
}
PUBLISHED = {
    # MadCLIP paper, Table 1 (16-shot), both methods
    ("madclip", 16): {
        "HIS": (90.14, None),
        "Chest": (88.15, None),
        "OCT17": (99.71, None),
        "BrainMRI": (95.90, 97.97),
        "LiverCT": (91.46, 99.74),
        "RESC": (99.11, 99.45),
    },
    ("mvfa", 16): {
        "HIS": (82.62, None),
        "Chest": (85.72, None),
        "OCT17": (99.66, None),
        "BrainMRI": (94.40, 97.70),
        "LiverCT": (83.85, 99.73),
        "RESC": (97.25, 99.07),
    },
    # MVFA-AD README (paper, 4-shot)
    ("mvfa", 4): {
        "HIS": (82.71, None),
        "Chest": (81.95, None),
        "OCT17": (99.38, None),
        "BrainMRI": (92.44, 97.30),
        "LiverCT": (81.18, 99.73),
        "RESC": (96.18, 98.97),
    },
}
PUBLISHED_AVERAGES = {
    ("madclip", 2): (90.12, 98.16),
    ("madclip", 4): (90.39, 98.69),
    ("madclip", 8): (92.02, 98.89),
    ("madclip", 16): (94.08, 99.05),
    ("mvfa", 16): (90.58, 98.83),
    ("mvfa", 4): (88.97, 98.67),
}


def datasets(root: Path) -> list[Path]:
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.endswith("_AD"))
    if not found:
        raise SystemExit(f"{root}: no <Obj>_AD dataset folders")
    return found


def bundle_bytes(bundle: Path) -> int:
    return sum(
        p.stat().st_size
        for p in bundle.rglob("*")
        if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".data"))
    )


def cpu_latency_ms(bundle: Path, image_size: int, iters: int) -> float:
    """Median batch-1 latency of the FP32 bundle model on the CPU (onnxruntime), after 2 warm-up runs."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, image_size, image_size), dtype=np.float32)
    times = []
    for i in range(iters + 2):
        t0 = time.perf_counter()
        sess.run(None, {sess.get_inputs()[0].name: x})
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def run_cell(data: Path, k: int, method: Method, args, cell: Path) -> dict:
    """Train, evaluate (every mode), export and time one (dataset, k, method); returns the result record."""
    run_dir, bundle = cell / "run", cell / "bundle"
    cmd = [
        tool("madclip-train"),
        "--method",
        method.name,
        "--data",
        str(data),
        "--shots",
        str(k),
        "--seed",
        str(args.seed),
        "--out",
        str(run_dir),
        "--backbone",
        args.backbone,
        "--pretrained",
        args.pretrained,
        "--device",
        args.device,
        "--force",
        *method.train_args,
    ]
    shot_list = (
        Path(args.shot_lists) / data.name[:-3] / f"{k}-shot.txt"
        if args.shot_lists and method.shot_lists
        else None
    )
    if shot_list is not None and shot_list.is_file():
        cmd += ["--shot-list", str(shot_list)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    train = run(cmd)
    record = {
        "dataset": data.name,
        "k": k,
        "method": method.name,
        "seed": args.seed,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "shot_list": str(shot_list) if shot_list and shot_list.is_file() else None,
        "train_seconds": train.seconds,
        "train_peak_rss_mb": train.peak_rss_mb,
        "eval": {},
    }
    for mode, extra in method.eval_modes.items():
        out = cell / f"eval_{mode}.json"
        run(
            [
                tool("madclip-eval"),
                str(run_dir),
                "--data",
                str(data),
                "--json",
                str(out),
                "--device",
                args.device,
                *extra,
            ]
        )
        record["eval"][mode] = json.loads(out.read_text())
    run([tool("madclip-export"), str(run_dir), "--out", str(bundle), "--force"])
    config = json.loads((run_dir / "config.json").read_text())
    record["export_mb"] = bundle_bytes(bundle) / 1e6
    record["cpu_latency_ms"] = cpu_latency_ms(
        bundle, int(config["model"]["preprocess"]["image_size"]), args.latency_iters
    )
    return record


def pct(v):
    return None if v is None else 100.0 * v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder holding <Obj>_AD datasets")
    p.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=[m.name for m in METHODS])
    p.add_argument("--shot-lists", help="folder of the authors' shot lists: <folder>/<Obj>/<k>-shot.txt")
    p.add_argument("--seed", type=int, default=111)
    p.add_argument("--backbone", default="ViT-L-14-336")
    p.add_argument("--pretrained", default="openai")
    p.add_argument("--epochs", type=int, help="override every method's default epoch count (pipeline checks)")
    p.add_argument("--device", default="auto")
    p.add_argument("--latency-iters", type=int, default=10)
    p.add_argument(
        "--work", default=str(WORK / "compare_methods"), help="per-cell results (resume from here)"
    )
    p.add_argument("--force", action="store_true", help="recompute finished cells")
    args = p.parse_args()
    print_machine()
    methods = [m for m in METHODS if m.name in args.methods]
    unknown = set(args.methods) - {m.name for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {[m.name for m in METHODS]}")
    records = []
    for data in datasets(Path(args.root)):
        for k in args.shots:
            for method in methods:
                cell = Path(args.work) / data.name / f"k{k}" / method.name
                done = cell / "result.json"
                if done.is_file() and not args.force:
                    console.print(f"[dim]resume: {data.name} k={k} {method.name} already done[/dim]")
                    records.append(json.loads(done.read_text()))
                    continue
                cell.mkdir(parents=True, exist_ok=True)
                rec = run_cell(data, k, method, args, cell)
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec, indent=2) + "\n")
                tmp.replace(done)
                records.append(rec)
    rows = []
    for r in records:
        for mode, m in r["eval"].items():
            rows.append(
                [
                    r["dataset"],
                    r["k"],
                    f"{r['method']} ({mode})",
                    pct(m.get("image_auroc")),
                    pct(m.get("pixel_auroc")),
                    pct(m.get("aupro")),
                    r["train_seconds"],
                    r["export_mb"],
                    r["cpu_latency_ms"],
                ]
            )
    table(
        f"methods on {args.root} ({args.backbone}, {args.pretrained}, seed {args.seed})",
        [
            "dataset",
            "k",
            "method",
            "image AUROC %",
            "pixel AUROC %",
            "AUPRO %",
            "train s",
            "export MB",
            "CPU ms (b=1)",
        ],
        rows,
    )
    paper_rows = paper_layout(records, methods)
    write_json("compare_methods.json", {"args": vars(args), "records": records, "paper_layout": paper_rows})


def paper_layout(records: list[dict], methods: list[Method]) -> list[dict]:
    """AC / AS per dataset and the averages (AC over all datasets, AS over those with masks), per (method, k),
    in the mode comparable with the paper, beside the published values."""
    out = []
    for method in methods:
        for k in sorted({r["k"] for r in records}):
            cells = [r for r in records if r["method"] == method.name and r["k"] == k]
            if not cells:
                continue
            row = {"method": method.name, "k": k, "mode": method.paper_mode, "datasets": {}}
            acs, ass = [], []
            for r in cells:
                m = r["eval"].get(method.paper_mode) or next(iter(r["eval"].values()))
                short = SHORT.get(r["dataset"][:-3], r["dataset"])
                ac, as_ = pct(m.get("image_auroc")), pct(m.get("pixel_auroc"))
                pub = PUBLISHED.get((method.name, k), {}).get(short, (None, None))
                row["datasets"][short] = {"AC": ac, "AS": as_, "published_AC": pub[0], "published_AS": pub[1]}
                acs += [ac] if ac is not None else []
                ass += [as_] if as_ is not None else []
            row["AC_avg"] = statistics.mean(acs) if acs else None
            row["AS_avg"] = statistics.mean(ass) if ass else None
            row["published_avg"] = PUBLISHED_AVERAGES.get((method.name, k))
            out.append(row)
            names = list(row["datasets"])
            table(
                f"paper layout: {method.name}, k={k} ({method.paper_mode}); ours / published",
                ["", *names, "average"],
                [
                    [
                        "AC",
                        *[_pair(row["datasets"][n]["AC"], row["datasets"][n]["published_AC"]) for n in names],
                        _pair(row["AC_avg"], (row["published_avg"] or (None, None))[0]),
                    ],
                    [
                        "AS",
                        *[_pair(row["datasets"][n]["AS"], row["datasets"][n]["published_AS"]) for n in names],
                        _pair(row["AS_avg"], (row["published_avg"] or (None, None))[1]),
                    ],
                ],
            )
    return out


def _pair(ours, published) -> str:
    a = "-" if ours is None else f"{ours:.2f}"
    b = "-" if published is None else f"{published:.2f}"
    return f"{a} / {b}"


if __name__ == "__main__":
    main()
