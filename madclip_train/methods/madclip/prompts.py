"""Learnable CoOp-style prompts (docs/METHODS.md §4) and the frozen text encoder they run through.

Per class (normal, abnormal): 7 state phrases built from the [Objective] word, each in 3 positions (end, front,
middle), each (phrase, position) with its own M = 8 context vectors. The 21 sequences of a class are encoded,
averaged (un-normalised) and L2-normalised into the class embedding t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...text_tower import TextEncoder, prompt_layout

NORMAL_STATES = (
    "{o}",
    "flawless {o}",
    "perfect {o}",
    "unblemished {o}",
    "{o} without flaw",
    "{o} without defect",
    "{o} without damage",
)
ABNORMAL_STATES = (
    "damaged {o}",
    "broken {o}",
    "{o} with flaw",
    "{o} with defect",
    "{o} with damage",
    "disease {o}",
    "abnormal {o}",
)
CLASSES = ("normal", "abnormal")
POSITIONS = ("end", "front", "middle")


def phrases(objective: str) -> dict[str, list[str]]:
    return {
        "normal": [s.format(o=objective) for s in NORMAL_STATES],
        "abnormal": [s.format(o=objective) for s in ABNORMAL_STATES],
    }


class PromptLearner(nn.Module):
    """Context vectors `ctx_{class}_{position}` [7, M, D] (the released checkpoint's layout) + fixed token ids."""

    def __init__(self, clip: nn.Module, tokenizer, objective: str, n_ctx: int = 8, causal: bool = False):
        super().__init__()
        if n_ctx % 2:
            raise ValueError("n_ctx must be even (the middle position splits it in halves)")
        self.n_ctx = n_ctx
        self.objective = objective
        self.token_embedding = clip.token_embedding  # frozen
        self.encoder = TextEncoder(clip, causal)
        width = clip.token_embedding.weight.shape[1]
        length = int(clip.positional_embedding.shape[0])
        sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        period = tokenizer.encode(".")
        self.ctx = nn.ParameterDict()
        for cls, texts in phrases(objective).items():
            for pos in POSITIONS:
                self.ctx[f"{cls}_{pos}"] = nn.Parameter(torch.randn(len(texts), n_ctx, width) * 0.02)
            ids, slots, eots = [], [], []
            for pos in POSITIONS:
                for text in texts:
                    seq, slot = prompt_layout(pos, sot, eot, tokenizer.encode(text), period, n_ctx)
                    if len(seq) > length:
                        raise ValueError(f"prompt too long for the text context: {text!r}")
                    eots.append(len(seq) - 1)
                    ids.append(seq + [0] * (length - len(seq)))  # pad id 0, as CLIP's tokenizer pads
                    slots.append(slot)
            self.register_buffer(f"ids_{cls}", torch.tensor(ids), persistent=False)  # [21, 77]
            self.register_buffer(f"slots_{cls}", torch.tensor(slots), persistent=False)  # [21, M]
            self.register_buffer(f"eot_{cls}", torch.tensor(eots), persistent=False)  # [21]

    def class_embedding(self, cls: str) -> torch.Tensor:
        """t for `cls`: L2-normalised mean of the 21 un-normalised sequence embeddings, [E]."""
        ids, slots = getattr(self, f"ids_{cls}"), getattr(self, f"slots_{cls}")
        embeds = self.token_embedding(ids)  # [21, 77, D]
        ctx = torch.cat([self.ctx[f"{cls}_{pos}"] for pos in POSITIONS])  # [21, M, D] in the same order
        index = slots.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        embeds = embeds.scatter(1, index, ctx.to(embeds.dtype))
        feats = self.encoder(embeds, getattr(self, f"eot_{cls}"))  # [21, E]
        return F.normalize(feats.mean(dim=0), dim=-1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_n, t_ab), each [E]."""
        return self.class_embedding("normal"), self.class_embedding("abnormal")
