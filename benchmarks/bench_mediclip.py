"""MediCLIP training speed: where a step's time goes, and the epoch time with and without prefetching.

Training images change every step (a new synthetic anomaly on every shot), so backbone features cannot be
cached across epochs. Per backbone (random weights), one batch of `--batch-size` shots is timed piece by piece
in this process with the trainer's own modules: anomaly synthesis (numpy/scipy), the frozen backbone forward
(no_grad, and inference_mode), the frozen text tower forward + backward (the CoOp context needs it every step)
and the adapters + map + focal/Dice forward + backward. Then whole epochs of the real training source
(synthesis on a background thread vs inline) are timed.

    python benchmarks/bench_mediclip.py                          # madclip-tiny and ViT-B-16
    python benchmarks/bench_mediclip.py --backbones madclip-tiny --epochs 3

Writes benchmarks/results/mediclip_train.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import print_machine, table, write_json


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def text_tower(backbone: str, repeats: int) -> dict:
    """Text tower forward + backward per step: maskless over all 77 positions (the reference) vs the causal
    mask, which lets the prompts be cut after their last EOT (`--causal-prompt-mask`). Text tower only."""
    import open_clip

    from madclip_train.backbone import create_clip
    from madclip_train.config import ModelConfig
    from madclip_train.methods.mediclip.prompts import MediPrompts

    clip = create_clip(ModelConfig(backbone=backbone, pretrained="none", quick_gelu=True))
    tok = open_clip.get_tokenizer(backbone)
    out = {}
    for name, causal in (("maskless_77", False), ("causal_cut_at_eot", True)):
        prompts = MediPrompts(clip, tok, causal=causal)
        prompts.token_embedding.requires_grad_(False)
        prompts.encoder.requires_grad_(False)
        out[name] = _median_ms(lambda p=prompts: p().square().sum().backward(), repeats)
    return {"backbone": backbone, "text_fwd_bwd_ms": out}


def measure(backbone: str, batch_size: int, n_shots: int, epochs: int, repeats: int) -> dict:
    import numpy as np
    import open_clip
    import torch

    from madclip_runtime.preprocess import PreprocessSpec
    from madclip_train.backbone import create_clip
    from madclip_train.config import ModelConfig
    from madclip_train.methods.mediclip.losses import mediclip_loss
    from madclip_train.methods.mediclip.net import MediCLIPNet, mediclip_taps
    from madclip_train.methods.mediclip.source import SynthBatches, build_batch
    from madclip_train.synthesis import Synthesizer

    size = 224
    spec = PreprocessSpec(image_size=size, interpolation="bilinear", normalize="clip")
    clip = create_clip(ModelConfig(backbone=backbone, pretrained="none", quick_gelu=True, preprocess=spec))
    torch.manual_seed(0)
    net = MediCLIPNet(
        clip, open_clip.get_tokenizer(backbone), mediclip_taps(len(clip.visual.transformer.resblocks)), size
    )
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - 112) ** 2 + (xx - 112) ** 2 < 80**2) * 110.0
    shots = [
        np.clip(30 + disc + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8) for _ in range(n_shots)
    ]
    synth = Synthesizer(shots)
    idx = list(range(batch_size))
    images, labels, masks = build_batch(synth, idx, 0, 0, spec)
    feats = net.taps(images)
    dt = net.text_dt().detach()

    def synthesis():
        build_batch(synth, idx, 0, 1, spec)

    def backbone_no_grad():
        net.taps(images)

    def backbone_inference_mode():
        with torch.inference_mode():
            torch.stack(net.backbone(images))

    def text_fwd_bwd():
        net.text_dt().square().sum().backward()

    def adapters_loss_fwd_bwd():
        mediclip_loss(net.map_logit(feats, dt), masks)["total"].backward()

    parts = {
        name: _median_ms(fn, repeats)
        for name, fn in [
            ("synthesis", synthesis),
            ("backbone_no_grad", backbone_no_grad),
            ("backbone_inference_mode", backbone_inference_mode),
            ("text_tower_fwd_bwd", text_fwd_bwd),
            ("adapters_map_loss_fwd_bwd", adapters_loss_fwd_bwd),
        ]
    }

    optimizer = torch.optim.Adam(net.trainable_parameters(), lr=1e-3, betas=(0.5, 0.999))

    def epoch_time(prefetch: bool) -> float:
        source = SynthBatches(synth, seed=0, batch_size=batch_size, spec=spec, prefetch=prefetch)
        gen = torch.Generator().manual_seed(0)
        times = []
        for e in range(epochs):
            t0 = time.perf_counter()
            for x, _, m in source.batches(e, gen):
                loss = mediclip_loss(net.map_logit(net.taps(x), net.text_dt()), m)["total"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:] if len(times) > 1 else times)

    inline = epoch_time(False)
    prefetched = epoch_time(True)
    import os

    return {
        "backbone": backbone,
        "batch_size": batch_size,
        "load_average_1min_at_end": os.getloadavg()[0],
        "n_shots": n_shots,
        "image_size": size,
        "step_ms": parts,
        "step_sum_ms": parts["synthesis"]
        + parts["backbone_no_grad"]
        + parts["text_tower_fwd_bwd"]
        + parts["adapters_map_loss_fwd_bwd"],
        "epoch_seconds_inline_synthesis": inline,
        "epoch_seconds_prefetch_thread": prefetched,
        "steps_per_epoch": -(-n_shots // batch_size),
        "epochs_timed": epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=["madclip-tiny", "ViT-B-16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared, oversubscribed CPU two threads thrash)",
    )
    ap.add_argument(
        "--text-only", action="store_true", help="only the text-tower comparison (maskless vs causal)"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print_machine()
    texts = [text_tower(b, args.repeats) for b in args.backbones]
    table(
        "MediCLIP text tower forward + backward per step (ms)",
        ["backbone", "maskless, 77 tokens (reference)", "causal mask, cut after EOT"],
        [
            [t["backbone"], t["text_fwd_bwd_ms"]["maskless_77"], t["text_fwd_bwd_ms"]["causal_cut_at_eot"]]
            for t in texts
        ],
    )
    if args.text_only:
        write_json("mediclip_text.json", {"text_tower": texts, "torch_threads": args.threads})
        return
    results = [measure(b, args.batch_size, args.shots, args.epochs, args.repeats) for b in args.backbones]
    rows = [
        [
            r["backbone"],
            *[
                r["step_ms"][k]
                for k in (
                    "synthesis",
                    "backbone_no_grad",
                    "backbone_inference_mode",
                    "text_tower_fwd_bwd",
                    "adapters_map_loss_fwd_bwd",
                )
            ],
            r["epoch_seconds_inline_synthesis"],
            r["epoch_seconds_prefetch_thread"],
        ]
        for r in results
    ]
    table(
        f"MediCLIP training step (batch {args.batch_size}, 224 px, ms) and epoch ({args.shots} shots, s)",
        [
            "backbone",
            "synthesis",
            "backbone no_grad",
            "backbone inference_mode",
            "text fwd+bwd",
            "adapters+loss fwd+bwd",
            "epoch inline",
            "epoch prefetch",
        ],
        rows,
    )
    write_json(
        "mediclip_train.json", {"results": results, "text_tower": texts, "torch_threads": args.threads}
    )


if __name__ == "__main__":
    main()
