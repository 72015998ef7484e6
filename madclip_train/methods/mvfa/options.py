"""MVFA's switches (ModelConfig.options; `--option KEY=VALUE`): the authors' code by default, clean variants on
request (see model.py's docstring)."""

from __future__ import annotations

from ..base import Option, OptionSchema
from .losses import DET_LOSSES

IMAGE_ONLY_SEG = ("frozen", "trained", "off")

OPTIONS = OptionSchema(
    "mvfa",
    (
        Option(
            "det_loss",
            "bce_on_prob",
            "detection loss: bce_on_prob (the reference: BCE-with-logits on a probability) or bce",
            choices=DET_LOSSES,
        ),
        Option(
            "image_only_seg",
            "frozen",
            "seg adapters on datasets without masks: frozen (the reference: random, "
            "written back), trained, or off (not written back)",
            choices=IMAGE_ONLY_SEG,
        ),
        Option("bank_cls", True, "the memory bank holds the CLS token too (the reference)"),
    ),
)
