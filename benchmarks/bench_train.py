"""Training benchmark: time per epoch with and without the feature cache, plus the one-off cache build.

For each backbone (random weights, `--pretrained none`), the same `madclip-train` config runs twice on the demo
data: `--feature-cache memory` (backbone once, epochs train adapters + prompts on cached fp16 features) and
`--feature-cache off` (backbone forward in every step). Epoch times come from the runs' train_log.jsonl, the
cache build time and size from config.json, peak RSS from the process itself.

A per-step breakdown (one batch, measured in this process with the trainer's own modules) shows where a
step's time goes: the frozen backbone forward (what the cache removes), the frozen text tower forward and
backward (the learnable prompts need it every step, cache or not) and the adapters + head + loss.

    python benchmarks/bench_train.py                      # madclip-tiny and ViT-B-16, 4+4 shots (128 images)
    python benchmarks/bench_train.py --backbones ViT-B-16 --shots 16
    python benchmarks/bench_train.py --precisions fp32,bf16,fp16   # epoch time and step breakdown per precision

`--precisions` runs the cached configuration once per training precision (`madclip-train --precision`, on the
device `--device` picks) and writes benchmarks/results/train_precision_{backbones}.json instead.

Writes benchmarks/results/train.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _common import WORK, demo_data, print_machine, run, table, tool, write_json


def epoch_seconds(history: list[dict]) -> float:
    """Median epoch time, leaving out epoch 1 (allocator and thread-pool warm-up) when there are more."""
    times = [r["seconds"] for r in history]
    return statistics.median(times[1:] if len(times) > 1 else times)


def step_breakdown(
    backbone: str,
    image_size: int,
    batch_size: int,
    repeats: int = 2,
    precision: str = "fp32",
    device: str = "cpu",
) -> dict:
    """Milliseconds per training step component for one batch of random images (seconds of the median run),
    the trainable parts under `precision`'s autocast (madclip_train.precision), the frozen backbone without."""
    import torch

    from madclip_runtime.preprocess import PreprocessSpec
    from madclip_train.precision import Precision

    amp = Precision.create(precision, torch.device(device))
    from madclip_train.config import ModelConfig
    from madclip_train.methods.madclip.losses import madclip_loss
    from madclip_train.model import build_model

    model = build_model(
        ModelConfig(backbone=backbone, pretrained="none", preprocess=PreprocessSpec(image_size=image_size)),
        seed=0,
    ).to(device)
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    labels = (torch.arange(batch_size) % 2).to(device)
    masks = torch.zeros(batch_size, image_size, image_size, dtype=torch.bool, device=device)
    masks[1::2, image_size // 4 : image_size // 2, image_size // 4 : image_size // 2] = True
    with torch.no_grad():
        feats = [f.half().float() for f in model.backbone(images)]  # what the cache hands the epochs

    def backbone_forward():
        with torch.no_grad():
            model.backbone(images)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def text_forward_backward():
        with amp.autocast():
            t_n, t_ab = model.text_embeddings()
        (t_ab - t_n).float().square().sum().backward()

    dt = model.text_embeddings()[1].detach() - model.text_embeddings()[0].detach()

    def adapters_head_loss():
        with amp.autocast():
            loss = madclip_loss(model.branch_logits(feats, dt), labels, masks, image_size)["total"]
        loss.backward()

    def full_cached_step():
        with amp.autocast():
            t_n, t_ab = model.text_embeddings()
            loss = madclip_loss(model.branch_logits(feats, t_ab - t_n), labels, masks, image_size)["total"]
        loss.backward()

    out = {}
    for name, fn in [
        ("backbone_forward", backbone_forward),
        ("text_forward_backward", text_forward_backward),
        ("adapters_head_loss_forward_backward", adapters_head_loss),
        ("full_cached_step", full_cached_step),
    ]:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        out[name + "_ms"] = round(statistics.median(times) * 1e3, 1)
    return out


def train(data, backbone: str, mode: str, args, precision: str | None = None) -> dict:
    out = WORK / "runs" / (f"train-{backbone}-{mode}" + (f"-{precision}" if precision else ""))
    epochs = args.epochs_cached if mode != "off" else args.epochs_uncached
    extra = ["--precision", precision, "--device", args.device] if precision else []
    m = run(
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
            str(args.image_size),
            "--shots",
            str(args.shots),
            "--epochs",
            str(epochs),
            "--batch-size",
            str(args.batch_size),
            "--feature-cache",
            mode,
            "--force",
            *extra,
        ]
    )
    history = [
        json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()
    ]
    config = json.loads((out / "config.json").read_text())
    cache = config["cache"]["train"]
    return {
        "backbone": backbone,
        "feature_cache": mode,
        "epochs": epochs,
        "precision": config["train"].get("precision"),
        "final_loss": history[-1]["loss_total"],
        "wall_seconds": round(m.seconds, 2),
        "peak_rss_mb": round(m.peak_rss_mb, 1),
        "epoch_seconds": epoch_seconds(history),
        "epoch_seconds_all": [r["seconds"] for r in history],
        "epoch1_loss": history[0]["loss_total"],
        "n_train_images": config["dataset"]["n_shots"] * (16 if config["train"]["augment"] else 1),
        "cache_build_seconds": cache.get("seconds"),
        "cache_bytes": cache.get("bytes"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="madclip-tiny,ViT-B-16")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--image-size", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs-cached", type=int, default=4)
    p.add_argument("--epochs-uncached", type=int, default=2)
    p.add_argument(
        "--breakdown-only",
        action="store_true",
        help="only the per-step breakdown (e.g. for ViT-L-14-336, whose epochs take many minutes here)",
    )
    p.add_argument(
        "--precisions", help="comma-separated training precisions (fp32,bf16,fp16): per-precision mode"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of the --precisions runs")
    args = p.parse_args()
    print_machine()
    data = demo_data()
    if args.precisions:
        precision_sweep(data, args)
        return
    rows, results, steps = [], [], []
    for backbone in args.backbones.split(","):
        if args.breakdown_only:
            breakdown = step_breakdown(backbone, args.image_size, args.batch_size)
            results.append({"backbone": backbone, "step_breakdown": breakdown})
            steps.append([backbone, *breakdown.values()])
            continue
        cached, uncached = train(data, backbone, "memory", args), train(data, backbone, "off", args)
        speedup = uncached["epoch_seconds"] / cached["epoch_seconds"]
        breakdown = step_breakdown(backbone, args.image_size, args.batch_size)
        results.append(
            {
                "backbone": backbone,
                "cached": cached,
                "uncached": uncached,
                "epoch_speedup": round(speedup, 2),
                "step_breakdown": breakdown,
            }
        )
        steps.append([backbone, *breakdown.values()])
        rows.append(
            [
                backbone,
                cached["n_train_images"],
                cached["cache_build_seconds"],
                cached["cache_bytes"] / 1e6,
                cached["peak_rss_mb"],
                uncached["peak_rss_mb"],
                cached["epoch_seconds"],
                uncached["epoch_seconds"],
                f"{speedup:.1f}x",
                f"{cached['epoch1_loss']:.5f} / {uncached['epoch1_loss']:.5f}",
            ]
        )
    if rows:
        table(
            f"training, {args.shots}+{args.shots} shots x16 augmentation, {args.image_size}px, batch {args.batch_size}",
            [
                "backbone",
                "images/epoch",
                "cache build s",
                "cache MB",
                "peak RSS cached MB",
                "peak RSS uncached MB",
                "epoch s cached",
                "epoch s uncached",
                "speedup",
                "epoch-1 loss cached / uncached",
            ],
            rows,
        )
    table(
        f"one training step, batch {args.batch_size} (ms, median of 2 after a warm-up)",
        [
            "backbone",
            "backbone fwd (cache removes)",
            "text tower fwd+bwd",
            "adapters+head+loss fwd+bwd",
            "full cached step",
        ],
        steps,
    )
    write_json(
        "train_breakdown.json" if args.breakdown_only else "train.json",
        {"settings": vars(args), "results": results},
    )


def precision_sweep(data, args) -> None:
    """Cached-feature training once per precision: epoch time, loss, and the per-step breakdown."""
    rows, steps, results = [], [], []
    for backbone in args.backbones.split(","):
        base = None
        for precision in args.precisions.split(","):
            r = train(data, backbone, "memory", args, precision)
            breakdown = step_breakdown(
                backbone, args.image_size, args.batch_size, precision=precision, device=args.device
            )
            base = base or r["epoch_seconds"]
            results.append({**r, "step_breakdown": breakdown})
            rows.append(
                [
                    backbone,
                    precision,
                    r["epochs"],
                    r["epoch_seconds"],
                    f"{base / r['epoch_seconds']:.2f}x",
                    f"{r['final_loss']:.5f}",
                    r["peak_rss_mb"],
                ]
            )
            steps.append([backbone, precision, *breakdown.values()])
    table(
        f"training per precision on {args.device}, {args.shots}+{args.shots} shots x16, {args.image_size}px, "
        f"batch {args.batch_size}, cached features",
        ["backbone", "precision", "epochs", "epoch s", "speed vs first", "final loss", "peak RSS MB"],
        rows,
    )
    table(
        f"one training step per precision, batch {args.batch_size} (ms, median of 2 after a warm-up)",
        [
            "backbone",
            "precision",
            "backbone fwd (cache removes)",
            "text tower fwd+bwd",
            "adapters+head+loss fwd+bwd",
            "full cached step",
        ],
        steps,
    )
    write_json(
        f"train_precision_{args.backbones.replace(',', '_')}.json",
        {"settings": vars(args), "results": results},
    )


if __name__ == "__main__":
    main()
