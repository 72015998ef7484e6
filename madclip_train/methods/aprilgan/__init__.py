"""APRIL-GAN (VAND challenge, CVPR 2023 workshop; ByChelsea/VAND-APRIL-GAN): a frozen CLIP tower, four trained
linear layers into the text space of a fixed prompt ensemble, and a few-shot memory bank of the normal shots' raw
patch tokens. docs/methods/aprilgan.md.

model.py      the MethodModel (METHOD)
tower.py      the frozen vision tower read at the four taps (CLS kept)
text.py       the fixed prompt ensemble -> text embeddings T
scores.py     zero-shot map, few-shot map (memory bank), text probability, the image score
bank.py       the memory bank and the cross-fitted fixed normalisers
losses.py     focal + Dice per layer
evaluate.py   the reference's transductive evaluation (test-set min-max)
export.py     the exported graph (bank, text and normalisers as constants)
reference.py  the authors' released checkpoints -> tensor names; bank rebuilt from the shots
options.py    the option schema (few_shot)
"""

from .model import AprilGANModel

METHOD = AprilGANModel

__all__ = ["METHOD", "AprilGANModel"]
