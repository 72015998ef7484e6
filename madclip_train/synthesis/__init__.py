"""Anomaly synthesis for training from normal images only (MediCLIP's `medsyn`), numpy/scipy/scikit-image.

tasks.py        the tasks (cutpaste, gauss, source, identity; disabled in the reference: smooth, sink)
perlin.py       single-cell Perlin noise and the Perlin blob shape
shapes.py       deformed rectangle / ellipse shapes with their edge intersection
labelling.py    the cutpaste soft labels
synthesizer.py  task mixture, per-sample seeding
io.py           loading normal scans as the grey uint8 images the tasks work on
preview.py      the preview grid of madclip-synth
"""

from .synthesizer import DEFAULT_MIX, Synthesizer, SynthSample, format_mix, parse_mix, sample_rng
from .tasks import TASKS

__all__ = ["DEFAULT_MIX", "SynthSample", "Synthesizer", "TASKS", "format_mix", "parse_mix", "sample_rng"]
