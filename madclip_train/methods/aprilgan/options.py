"""APRIL-GAN's switches (ModelConfig.options; `--option KEY=VALUE`): the authors' few-shot mode by default."""

from __future__ import annotations

from ..base import Option, OptionSchema

OPTIONS = OptionSchema(
    "aprilgan",
    (
        Option(
            "few_shot",
            True,
            "the memory bank of the normal shots (the reference's few-shot mode); false: its "
            "zero-shot mode (map = the trained layers' map, score = the text probability)",
        ),
    ),
)
