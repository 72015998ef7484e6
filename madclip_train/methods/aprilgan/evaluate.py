"""`madclip-eval --transductive` for APRIL-GAN: the reference's test-set normalisation, for paper-comparable
numbers. The reference min-max normalises max A over every test image before averaging it with the text
probability; that needs the whole test set at once, so it is an evaluation mode only. A deployed model (and the
plain `madclip-eval`) uses the fixed normalisers stored in the run. Without a bank the score is p either way.
"""

from __future__ import annotations

import numpy as np
import torch

from madclip_runtime.contract import SCORE, SCORE_MAP_MAX

from ...data import Split, load_arrays
from .scores import transductive_score


@torch.no_grad()
def predict_split_transductive(
    model, split: Split, batch_size: int = 16, device="cpu", progress=None
) -> dict:
    """Like madclip_train.evaluate.predict_split (same keys), with the test-set min-max of max A."""
    model.eval().to(device)
    samples = list(split.samples)
    parts: dict[str, list] = {"p": [], "max": [], "labels": [], "maps": [], "masks": []}
    task = progress.add_task(f"scoring {split.name} (transductive)", total=len(samples)) if progress else None
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images, masks, labels = load_arrays(chunk, model.cfg.preprocess)
        raw = model.raw_scores(model.cacheable(torch.from_numpy(images).to(device)))
        parts["p"].append(raw["p"].float().cpu().numpy())
        parts["max"].append(raw["max"].float().cpu().numpy())
        parts["labels"].append(labels)
        if split.has_masks:
            parts["maps"].append(raw["map"].float().cpu().numpy().astype(np.float16))
            parts["masks"].append(masks)
        if progress:
            progress.advance(task, len(chunk))
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}
    score = transductive_score(cat["p"], cat["max"]) if model.few_shot else cat["p"].astype(np.float64)
    out = {SCORE: score, SCORE_MAP_MAX: cat["max"], "labels": cat["labels"]}
    if split.has_masks:
        out["maps"], out["masks"] = cat["maps"], cat["masks"]
    return out
