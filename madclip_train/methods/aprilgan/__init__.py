"""APRIL-GAN (VAND challenge, CVPR 2023 workshop; ByChelsea/VAND-APRIL-GAN) as a madclip method: a frozen CLIP
tower, four trained linear layers into the text space of a fixed prompt ensemble, and a few-shot memory bank of
the normal shots' raw patch tokens. See model.py and docs/methods/aprilgan.md."""

from .model import AprilGANModel

__all__ = ["AprilGANModel"]
