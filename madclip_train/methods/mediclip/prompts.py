"""MediCLIP's learnable prompts: CoOp, 8 class-specific context vectors per word, class word at the end.

Sequence per word: SOT, ctx_1..ctx_8, word tokens, ".", EOT, padding (the reference's "X X ... X word."
with the X embeddings replaced). The text tower runs WITHOUT the causal mask by default, as the reference's
modified open_clip does (EOT also attends to the padding); `causal=True` is the clean variant. Class vector:
L2-normalised mean of the un-normalised EOT features of its words; T = [t_n, t_ab].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...text_tower import TextEncoder, prompt_layout

NORMAL_WORDS = (
    "normal",
    "healthy",
    "negative",
    "unremarkable",
    "clear",
    "asymptomatic",
    "normal findings",
    "no findings",
    "in good health",
    "no evidence of disease",
)
ABNORMAL_WORDS = (
    "abnormal",
    "positive",
    "symptomatic",
    "disease",
    "lesion",
    "pathological",
    "impaired",
    "evidence of disease",
    "abnormal finding",
    "pathological condition",
    "pathological abnormality",
)
WORDS = {"normal": NORMAL_WORDS, "abnormal": ABNORMAL_WORDS}
CTX_INIT_STD = 0.02


class MediPrompts(nn.Module):
    """Context vectors `ctx.{normal,abnormal}_end` [n_words, M, D] (the reference's names) + fixed token ids."""

    def __init__(self, clip: nn.Module, tokenizer, n_ctx: int = 8, causal: bool = False):
        super().__init__()
        self.n_ctx = n_ctx
        self.token_embedding = clip.token_embedding  # frozen
        self.encoder = TextEncoder(clip, causal)
        width = clip.token_embedding.weight.shape[1]
        length = int(clip.positional_embedding.shape[0])
        sot, eot, period = tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.encode(".")
        self.ctx = nn.ParameterDict()
        for cls, words in WORDS.items():
            self.ctx[f"{cls}_end"] = nn.Parameter(torch.randn(len(words), n_ctx, width) * CTX_INIT_STD)
            ids, slots, eots = [], [], []
            for word in words:
                seq, slot = prompt_layout("end", sot, eot, tokenizer.encode(word), period, n_ctx)
                if len(seq) > length:
                    raise ValueError(f"prompt too long for the text context: {word!r}")
                eots.append(len(seq) - 1)
                ids.append(seq + [0] * (length - len(seq)))
                slots.append(slot)
            self.register_buffer(f"ids_{cls}", torch.tensor(ids), persistent=False)  # [n_words, 77]
            self.register_buffer(f"slots_{cls}", torch.tensor(slots), persistent=False)  # [n_words, M]
            self.register_buffer(f"eot_{cls}", torch.tensor(eots), persistent=False)  # [n_words]

    def class_embedding(self, cls: str) -> torch.Tensor:
        ids, slots = getattr(self, f"ids_{cls}"), getattr(self, f"slots_{cls}")
        embeds = self.token_embedding(ids)  # [n_words, 77, D]
        index = slots.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
        embeds = embeds.scatter(1, index, self.ctx[f"{cls}_end"].to(embeds.dtype))
        feats = self.encoder(embeds, getattr(self, f"eot_{cls}"))  # [n_words, E]
        return F.normalize(feats.mean(dim=0), dim=-1)  # [E]

    def forward(self) -> torch.Tensor:
        """T [E, 2]: columns t_n, t_ab."""
        return torch.stack([self.class_embedding("normal"), self.class_embedding("abnormal")], dim=1)
