"""MVFA training step: with and without the prefix feature cache, and where a step's time goes.

MVFA's adapters write back into the residual stream, so only the blocks up to the first tap (block 6 of 24 for
ViT-L, 3 of 12 for ViT-B) are a pure function of the image and can be cached; every later block runs forward
and backward at every step. This measures, in this process, one training step (the reference's batch size 1,
mask dataset: det + focal + dice losses, both adapter sets stepped) split into: the prefix forward (what the
cache removes), the suffix forward (blocks after the first tap with the adapters), the losses, the backward
pass and the optimiser step. Epoch time = median step x images per epoch (k normal + k abnormal shots x 11).

    python benchmarks/bench_mvfa_cache.py                          # madclip-tiny
    python benchmarks/bench_mvfa_cache.py --backbones madclip-tiny ViT-B-16 --steps 5

Random weights (`--pretrained none`): timing does not depend on the weights. Writes
benchmarks/results/mvfa_cache.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import print_machine, table, write_json


def measure(backbone: str, steps: int, shots: int, image_size: int = 240) -> dict:
    import torch

    from madclip_train.config import ModelConfig
    from madclip_train.methods.mvfa import MVFAModel

    torch.manual_seed(0)
    model = MVFAModel.build(
        ModelConfig(backbone=backbone, pretrained="none", objective="Brain", image_size=image_size), seed=0
    )
    opt = torch.optim.Adam(model.trainable_parameters(has_masks=True), lr=1e-3, betas=(0.5, 0.999))
    image = torch.rand(1, 3, image_size, image_size)
    mask = torch.zeros(1, image_size, image_size)
    mask[:, 60:120, 60:120] = 1
    label = torch.tensor([1])
    cached = model.cacheable(image).half()  # what the cache stores
    rows = {"prefix_forward": [], "suffix_forward": [], "losses": [], "backward": [], "optimizer": []}
    for _ in range(steps + 1):  # the first step is warm-up
        t0 = time.perf_counter()
        with torch.no_grad():
            model.cacheable(image)
        t1 = time.perf_counter()
        seg, det = model.tower.suffix(cached.float())
        t2 = time.perf_counter()
        from madclip_train.methods.mvfa.losses import det_loss, seg_losses

        focal, dice = seg_losses(seg, model.text, mask, image_size)
        loss = det_loss(det, model.text, label) + focal + dice
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        t5 = time.perf_counter()
        for k, v in zip(rows, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            rows[k].append(v)
    med = {k: statistics.median(v[1:]) for k, v in rows.items()}
    per_epoch = 2 * shots * 11
    step_cached = med["suffix_forward"] + med["losses"] + med["backward"] + med["optimizer"]
    return {
        "backbone": backbone,
        "depth": len(model.tower.visual.transformer.resblocks),
        "taps": list(model.tower.taps),
        "steps_measured": steps,
        "images_per_epoch": per_epoch,
        "ms": {k: 1000 * v for k, v in med.items()},
        "epoch_s_cached": per_epoch * step_cached,
        "epoch_s_uncached": per_epoch * (step_cached + med["prefix_forward"]),
        "cache_mb_per_image_fp16": cached.numel() * 2 / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", default=["madclip-tiny"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--shots", type=int, default=4)
    args = p.parse_args()
    print_machine()
    results = [measure(b, args.steps, args.shots) for b in args.backbones]
    cols = [
        "backbone",
        "prefix fwd ms",
        "suffix fwd ms",
        "losses ms",
        "backward ms",
        "adam ms",
        "epoch s cached",
        "epoch s uncached",
        "speed-up",
    ]
    table(
        f"MVFA training step (batch 1, k={args.shots}: {2 * args.shots * 11} images/epoch)",
        cols,
        [
            [
                r["backbone"],
                r["ms"]["prefix_forward"],
                r["ms"]["suffix_forward"],
                r["ms"]["losses"],
                r["ms"]["backward"],
                r["ms"]["optimizer"],
                r["epoch_s_cached"],
                r["epoch_s_uncached"],
                r["epoch_s_uncached"] / r["epoch_s_cached"],
            ]
            for r in results
        ],
    )
    write_json("mvfa_cache.json", {"results": results, "shots": args.shots, "steps": args.steps})


if __name__ == "__main__":
    main()
