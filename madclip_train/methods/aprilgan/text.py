"""APRIL-GAN's fixed text side: a prompt ensemble (7 normal / 5 abnormal states x 35 templates) encoded once
into T = [t_n, t_ab] [E, 2]. Nothing is learnable.

Each filled sentence goes through the standard CLIP text path (causal mask, EOT pooling, projection) and is
L2-normalised; a class's sentences are averaged and the mean is L2-normalised again. The templates are listed in
the order the reference encodes them, so the float sums (hence T) agree with it to the last bits. The object
word is the dataset's (Brain, Liver, "retinal OCT", ...), `ModelConfig.objective`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from madclip_train.prompt_ensemble import ensemble_sentences as _sentences

# (adjective or "", article): "a[ adjective] photo of <article> {}." in the reference's order, then the rest
_PHOTO = (
    ("bad", "a"),
    ("low resolution", "the"),
    ("bad", "the"),
    ("cropped", "the"),
    ("bright", "a"),
    ("dark", "the"),
    ("", "my"),
    ("", "the cool"),
    ("close-up", "a"),
    ("black and white", "the"),
    ("bright", "the"),
    ("cropped", "a"),
    ("jpeg corrupted", "a"),
    ("blurry", "the"),
    ("", "the"),
    ("good", "the"),
    ("", "one"),
    ("close-up", "the"),
    ("", "a"),
    ("low resolution", "a"),
    ("", "a large"),
    ("blurry", "a"),
    ("jpeg corrupted", "the"),
    ("good", "a"),
    ("", "the small"),
    ("", "the large"),
    ("black and white", "a"),
    ("dark", "a"),
    ("", "a cool"),
    ("", "a small"),
)
TEMPLATES = tuple(f"a {adj + ' ' if adj else ''}photo of {art} {{}}." for adj, art in _PHOTO) + (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)
assert len(TEMPLATES) == 35 and len(set(TEMPLATES)) == 35


def ensemble_sentences(objective: str) -> dict[str, list[str]]:
    """{"normal": 245 sentences, "abnormal": 175 sentences} for an object word (states outer, templates inner)."""
    return _sentences(objective, TEMPLATES)


@torch.no_grad()
def encode_ensemble(clip: nn.Module, tokenizer, objective: str) -> torch.Tensor:
    """Text embeddings T [E, 2] (columns normal, abnormal), each column unit length. fp32.

    Each class is encoded in one batch, as the reference does (the batch size changes the last bits)."""
    cols = []
    for sentences in ensemble_sentences(objective).values():
        feats = F.normalize(clip.encode_text(tokenizer(sentences)).float(), dim=-1)  # [n, E]
        cols.append(F.normalize(feats.mean(dim=0), dim=0))
    return torch.stack(cols, dim=1)
