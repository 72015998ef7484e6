"""Learnable CoOp-style prompts (docs/METHODS.md §4) and the frozen text encoder they run through.

Per class (normal, abnormal): 7 state phrases built from the [Objective] word, each in 3 positions (end, front,
middle), each (phrase, position) with its own M = 8 context vectors. The 21 sequences of a class are encoded,
averaged (un-normalised) and L2-normalised into the class embedding t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMAL_STATES = ("{o}", "flawless {o}", "perfect {o}", "unblemished {o}", "{o} without flaw",
                 "{o} without defect", "{o} without damage")
ABNORMAL_STATES = ("damaged {o}", "broken {o}", "{o} with flaw", "{o} with defect", "{o} with damage",
                   "disease {o}", "abnormal {o}")
CLASSES = ("normal", "abnormal")
POSITIONS = ("end", "front", "middle")


def phrases(objective: str) -> dict[str, list[str]]:
    return {"normal": [s.format(o=objective) for s in NORMAL_STATES],
            "abnormal": [s.format(o=objective) for s in ABNORMAL_STATES]}


class TextEncoder(nn.Module):
    """The frozen CLIP text tower applied to token embeddings: + positions, transformer, ln_final, EOT pool, proj.

    `causal=False` reproduces the reference (learnable prompts encoded without the causal mask).
    """

    def __init__(self, clip: nn.Module, causal: bool):
        super().__init__()
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask if causal else None, persistent=False)

    def forward(self, embeds: torch.Tensor, eot_index: torch.Tensor, full_length: bool = False) -> torch.Tensor:
        """embeds [N, 77, D] -> features at the EOT tokens [N, E].

        With the causal mask no token sees a later one, so the padding after the last EOT cannot change the
        result: the sequences are cut there (exact, and ~4x less text-tower work per training step). Without
        the mask (the reference) every one of the 77 positions attends to every other, so all are kept.
        """
        x = embeds + self.positional_embedding
        mask = self.attn_mask
        if mask is not None and not full_length:
            length = int(eot_index.max()) + 1
            x, mask = x[:, :length], mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index]  # [N, D]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection  # [N, E]


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
                    seq, slot = _layout(pos, sot, eot, tokenizer.encode(text), period, n_ctx)
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


def _layout(pos: str, sot: int, eot: int, phrase: list[int], period: list[int], n_ctx: int):
    """Token ids with placeholder 0s for context slots, and the slot indices. Returns (ids, slots)."""
    half = n_ctx // 2
    if pos == "end":
        parts = [("ctx", n_ctx), ("tok", phrase)]
    elif pos == "front":
        parts = [("tok", phrase), ("ctx", n_ctx)]
    else:
        parts = [("ctx", half), ("tok", phrase), ("ctx", n_ctx - half)]
    seq, slots = [sot], []
    for kind, val in parts:
        if kind == "ctx":
            slots.extend(range(len(seq), len(seq) + val))
            seq.extend([0] * val)
        else:
            seq.extend(val)
    seq.extend(period + [eot])
    return seq, slots
