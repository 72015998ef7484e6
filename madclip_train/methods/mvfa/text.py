"""MVFA's fixed text side: a 7 + 5 state x 35 template prompt ensemble, encoded once into T = [t_n, t_ab].

Nothing here is learnable. Each filled sentence goes through the standard CLIP text path (causal mask, EOT
pooling, projection), is L2-normalised, the class's sentences are averaged and the mean is L2-normalised
again. The object word is the dataset's (Brain, Liver, "retinal OCT", ...), the same words MadCLIP uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from madclip_train.prompt_ensemble import ensemble_sentences as _sentences

_ADJECTIVES = (
    "bad",
    "low resolution",
    "cropped",
    "bright",
    "dark",
    "close-up",
    "black and white",
    "jpeg corrupted",
    "blurry",
    "good",
)
TEMPLATES = (
    tuple(f"a {adj} photo of {art} {{}}." for adj in _ADJECTIVES for art in ("a", "the"))
    + tuple(f"a photo of {art} {{}}." for art in ("a", "the"))
    + tuple(f"a photo of {art} {size} {{}}." for art in ("a", "the") for size in ("cool", "small", "large"))
    + ("a photo of my {}.", "a photo of one {}.")
    + tuple(f"there is {art} {{}} in the scene." for art in ("a", "the"))
    + tuple(f"this is {art} {{}} in the scene." for art in ("a", "the", "one"))
)
assert len(TEMPLATES) == 35


def ensemble_sentences(objective: str) -> dict[str, list[str]]:
    """{"normal": 245 sentences, "abnormal": 175 sentences} for an object word."""
    return _sentences(objective, TEMPLATES)


@torch.no_grad()
def encode_ensemble(clip: nn.Module, tokenizer, objective: str, chunk: int = 64) -> torch.Tensor:
    """Text embeddings T [E, 2] (columns normal, abnormal), each column unit length. fp32."""
    cols = []
    for sentences in ensemble_sentences(objective).values():
        feats = []
        for start in range(0, len(sentences), chunk):
            tokens = tokenizer(sentences[start : start + chunk])
            feats.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))  # [n, E]
        cols.append(F.normalize(torch.cat(feats).mean(dim=0), dim=0))  # [E]
    return torch.stack(cols, dim=1)  # [E, 2]
