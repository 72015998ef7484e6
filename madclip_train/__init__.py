"""madclip_train: the MadCLIP few-shot trainer (PyTorch, open_clip). Research use, not for clinical decisions."""

__version__ = "0.1.0"
