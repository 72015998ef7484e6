"""MediCLIP building blocks: loss against hand-computed values, prompts, map maths, checkpoint conversion."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from madclip_runtime.errors import MadclipError
from madclip_train.methods.mediclip.losses import focal_target, mediclip_loss
from madclip_train.methods.mediclip.reference import convert_reference


def _focal_by_hand(p_ab: float, cls: int) -> float:
    """The reference FocalLoss for one pixel: one-hot clamped to [1e-5, 1 - 1e-5], p_t + 1e-5, gamma 2."""
    onehot = [1e-5, 1 - 1e-5] if cls == 1 else [1 - 1e-5, 1e-5]
    pt = onehot[0] * (1 - p_ab) + onehot[1] * p_ab + 1e-5
    return -((1 - pt) ** 2) * math.log(pt)


def test_loss_matches_hand_computed_values():
    logit = torch.tensor([[[0.0, 2.0], [-1.0, 0.5]]], dtype=torch.float64)  # [1, 2, 2]
    labels = torch.tensor([[[1.0, 0.99], [0.0, 1.0]]], dtype=torch.float64)
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0, 0.5)]
    lab = [1.0, 0.99, 0.0, 1.0]
    # truncation: 0.99 -> class 0 (normal)
    focal = sum(_focal_by_hand(pi, int(li)) for pi, li in zip(p, lab)) / 4
    dice = 1 - (2 * sum(pi * li for pi, li in zip(p, lab)) + 1) / (sum(p) + sum(lab) + 1)
    out = mediclip_loss(logit, labels)
    assert float(out["focal"]) == pytest.approx(focal, rel=1e-12)
    assert float(out["dice"]) == pytest.approx(dice, rel=1e-12)
    assert float(out["total"]) == pytest.approx(focal + dice, rel=1e-12)
    # threshold switch: 0.99 -> class 1
    focal_t = sum(_focal_by_hand(pi, int(li >= 0.5)) for pi, li in zip(p, lab)) / 4
    assert float(mediclip_loss(logit, labels, "threshold")["focal"]) == pytest.approx(focal_t, rel=1e-12)
    assert focal_t != pytest.approx(focal)


def test_focal_target_truncates_soft_labels():
    labels = torch.tensor([0.0, 0.4, 0.9999963, 1.0])
    assert focal_target(labels).tolist() == [0, 0, 0, 1]
    assert focal_target(labels, "threshold").tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        focal_target(labels, "round")


def test_sigmoid_of_difference_equals_reference_softmax_map():
    """mean over layers -> upsample (align_corners) -> softmax, as MapMaker, equals our sigmoid form."""
    from madclip_train.maps import upsample_logits

    g = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(2, 16, 8, generator=g), dim=-1) for _ in range(3)]  # L x [B, P, E]
    t = F.normalize(torch.randn(8, 2, generator=g), dim=0)  # [E, 2]
    maps = torch.stack([(f @ t).view(2, 4, 4, 2).permute(0, 3, 1, 2) for f in feats]).mean(0)  # [B, 2, 4, 4]
    ref = torch.softmax(F.interpolate(maps, (12, 12), mode="bilinear", align_corners=True), dim=1)[:, 1]
    mean = torch.stack([f @ (t[:, 1] - t[:, 0]) for f in feats]).mean(0)  # [B, P]
    ours = torch.sigmoid(upsample_logits(mean.unsqueeze(0), 12)[0])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def _reference_checkpoint(e=32, w=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ad = {}
    for i in range(3):
        ad[f"{i}_adapter.0.weight"] = torch.randn(e, w, 1, 1, generator=g)
        ad[f"{i}_adapter.0.bias"] = torch.randn(e, generator=g)
    pr = {
        "ctx.normal_end": torch.randn(10, 8, 64, generator=g),
        "ctx.abnormal_end": torch.randn(11, 8, 64, generator=g),
    }
    return {"adapter_state_dict": ad, "prompt_state_dict": pr}


def test_convert_reference_layout(tmp_path):
    path = tmp_path / "checkpoints_7.pkl"
    torch.save(_reference_checkpoint(), path)
    ref = torch.load(path, map_location="cpu", weights_only=True)  # no code executed
    out = convert_reference(ref, source=str(path))
    assert out["adapters.0.weight"].shape == (32, 64) and out["adapters.2.bias"].shape == (32,)
    assert out["prompts.ctx.normal_end"].shape == (10, 8, 64) and out["prompts.ctx.abnormal_end"].shape == (
        11,
        8,
        64,
    )
    # the 1x1 convolution and the linear layer compute the same thing
    x = torch.randn(2, 64, 4, 4)
    conv = F.conv2d(
        x, ref["adapter_state_dict"]["1_adapter.0.weight"], ref["adapter_state_dict"]["1_adapter.0.bias"]
    )
    lin = F.linear(x.flatten(2).transpose(1, 2), out["adapters.1.weight"], out["adapters.1.bias"])
    torch.testing.assert_close(lin, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    bad = _reference_checkpoint()
    del bad["prompt_state_dict"]["ctx.abnormal_end"]
    with pytest.raises(MadclipError, match="ctx.abnormal_end"):
        convert_reference(bad, source="x.pkl")
    with pytest.raises(MadclipError, match="not a MediCLIP"):
        convert_reference({"state_dict": {}}, source="x.pkl")
