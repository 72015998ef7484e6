"""`madclip-eval --transductive` for MVFA: the reference's test-set normalisation, for paper-comparable numbers.

The reference min-max normalises the zero-shot map Z and the few-shot map F with the min and max over every
pixel of every test image (image-only datasets: the image-level z and f over all test images) before mixing
them 0.5/0.5. That needs the whole test set at once, so it is an evaluation mode only; a deployed model (and
the plain `madclip-eval`) uses the fixed normalisers stored in the run.
"""

from __future__ import annotations

import numpy as np
import torch

from madclip_runtime.contract import SCORE, SCORE_MAP_MAX

from ...data import Split, load_arrays
from .scores import transductive_mix


@torch.no_grad()
def predict_split_transductive(
    model, split: Split, batch_size: int = 16, device="cpu", progress=None
) -> dict:
    """Like madclip_train.evaluate.predict_split (same keys), with test-set min-max normalisation."""
    model.eval().to(device)
    samples = list(split.samples)
    parts: dict[str, list] = {"Z": [], "F": [], "z": [], "f": [], "labels": [], "masks": []}
    task = progress.add_task(f"scoring {split.name} (transductive)", total=len(samples)) if progress else None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images, masks, labels = load_arrays(chunk, model.cfg.preprocess)
        raw = model.raw_scores(model.cacheable(torch.from_numpy(images).to(device)))
        for k in ("Z", "F", "z", "f"):
            parts[k].append(raw[k].float().cpu().numpy())
        parts["labels"].append(labels)
        if split.has_masks:
            parts["masks"].append(masks)
        if progress:
            progress.advance(task, len(chunk))
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    amap = transductive_mix(cat["Z"], cat["F"]).astype(np.float32)  # [N, S, S]
    amax = amap.reshape(amap.shape[0], -1).max(axis=1)
    score = amax if model.masks_mode else transductive_mix(cat["z"], cat["f"])
    out = {SCORE: score, SCORE_MAP_MAX: amax, "labels": cat["labels"]}
    if split.has_masks:
        out["maps"] = amap.astype(np.float16)
        out["masks"] = cat["masks"]
    return out
