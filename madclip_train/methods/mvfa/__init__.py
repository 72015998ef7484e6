"""MVFA (Huang et al., CVPR 2024): residual adapters written back into the CLIP stream, a fixed prompt-ensemble
text side and a few-shot memory bank.

model.py      the MethodModel (METHOD)
tower.py      the vision tower with the 8 residual adapters (written back into the stream)
text.py       the fixed prompt ensemble -> text embeddings T
scores.py     zero-shot and few-shot (memory bank) maps and their mixing
bank.py       the memory bank and the cross-fitted fixed normalisers
augment.py    the reference's x11 offline augmentation
losses.py     det loss (the reference's BCE on a probability) + focal + Dice
eval.py       the reference's transductive evaluation (test-set min-max)
export.py     the exported graph (bank, text and normalisers as constants)
reference.py  the authors' released checkpoints -> tensor names; bank rebuilt from the shots
options.py    the option schema (det_loss, image_only_seg, bank_cls)
"""

from .model import MVFAModel

METHOD = MVFAModel

__all__ = ["METHOD", "MVFAModel"]
