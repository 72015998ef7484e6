"""MediCLIP's switches (ModelConfig.options): `--option KEY=VALUE`, and flags of madclip-train for two of them."""

from __future__ import annotations

from ...synthesis import DEFAULT_MIX, TASKS, format_mix, parse_mix
from ..base import Option, OptionSchema
from .losses import FOCAL_TARGETS


def _mix(value) -> str:
    """A mixture as text ("cutpaste=0.5,gauss") or the flag's list (["cutpaste=0.5", "gauss"]) -> canonical text."""
    return format_mix(parse_mix(value))


OPTIONS = OptionSchema(
    "mediclip",
    (
        Option(
            "tasks",
            format_mix(DEFAULT_MIX),
            f"anomaly-synthesis mixture, e.g. 'cutpaste=0.5 gauss' (known: "
            f"{', '.join(TASKS)}; default: cutpaste, gauss, source, identity at 0.25 each, as the reference); "
            "preview with madclip-synth",
            parse=_mix,
            flag="--synth-tasks",
            nargs="+",
            metavar="NAME[=P]",
        ),
        Option(
            "focal_target",
            "truncate",
            "focal-loss class of a soft label: truncate (the reference: below 1.0 is "
            "normal, default) or threshold (>= 0.5)",
            choices=FOCAL_TARGETS,
            flag="--focal-target",
        ),
        Option("holdout_per_shot", 8, "synthetic samples per held-out shot (--select-on valid)"),
        Option("prefetch", True, "synthesise the next batch on a background thread"),
    ),
)
