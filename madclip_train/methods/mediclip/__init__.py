"""MediCLIP (MICCAI 2024, cnulab/MediCLIP): few-shot anomaly detection trained from normal images only.

model.py      the MethodModel (METHOD)
prompts.py    CoOp class-specific context vectors at the end of the reference's normal/abnormal word lists
net.py        frozen CLIP taps (blocks 12/18/24 of 24) -> linear adapters + L2 -> cosine with T -> map, score
losses.py     focal (with the reference's integer-truncated target) + Dice on the synthetic masks
source.py     synthetic training batches (madclip_train.synthesis) and the held-out synthetic set
export.py     the exported graph (prompts baked as the constant dt)
reference.py  the authors' saved checkpoint format -> this package's tensor names
options.py    the option schema (synthesis tasks, focal target, held-out set, prefetch)
"""

from .model import MediCLIP

METHOD = MediCLIP

__all__ = ["METHOD", "MediCLIP"]
