"""MadCLIP (MICCAI 2025): dual-branch side adapters on 4 tapped layers of a frozen CLIP, learnable prompts.

model.py      the MethodModel (METHOD)
adapters.py   the 8 dual-branch adapters
prompts.py    learnable CoOp-style prompts built from the [Objective] word
head.py       the score head (dt = t_ab - t_n), shared by training, evaluation and export
losses.py     SigLIP-style detection loss + focal + Dice
export.py     the exported graph (text tower baked as the constant dt)
reference.py  the authors' released checkpoints -> tensor names
options.py    the option schema (no switches)
"""

from .model import MadCLIP

METHOD = MadCLIP

__all__ = ["METHOD", "MadCLIP"]
