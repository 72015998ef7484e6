"""The frozen CLIP text tower run on token embeddings, and the token layout of learnable-context prompts.

Shared by the methods whose prompts hold learnable context vectors (MadCLIP, MediCLIP).
"""

from __future__ import annotations

import torch
from torch import nn


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

    def forward(
        self, embeds: torch.Tensor, eot_index: torch.Tensor, full_length: bool = False
    ) -> torch.Tensor:
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


def prompt_layout(pos: str, sot: int, eot: int, phrase: list[int], period: list[int], n_ctx: int):
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
