"""MediCLIP (MICCAI 2024, cnulab/MediCLIP): few-shot anomaly detection trained from normal images only.

prompts.py   CoOp class-specific context vectors at the end of the reference's normal/abnormal word lists
net.py       frozen CLIP taps (blocks 12/18/24 of 24) -> linear adapters + L2 -> cosine with T -> map, score
losses.py    focal (with the reference's integer-truncated target) + Dice on the synthetic masks
source.py    synthetic training batches (madclip_train.synthesis) and the held-out synthetic set
convert.py   the authors' saved checkpoint format -> this package's tensor names
"""
