"""MadCLIP's switches: none beyond the ModelConfig fields (--quick-gelu, --causal-prompt-mask, --normalize)."""

from __future__ import annotations

from ..base import OptionSchema

OPTIONS = OptionSchema("madclip", ())
