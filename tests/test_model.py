"""Shapes, the closed form of p_ab, the score head and the losses against hand-computed values."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from madclip_train.maps import dice_loss, focal_loss, upsample_logits
from madclip_train.methods.madclip.head import branch_logits, score_outputs
from madclip_train.methods.madclip.losses import madclip_loss, siglip_detection_loss


def test_tapped_features_and_outputs_shapes(tiny_model):
    x = torch.rand(2, 3, 240, 240)
    feats = tiny_model.backbone(x)
    assert len(feats) == 4 and all(f.shape == (2, 289, 64) for f in feats)  # 17 x 17 patches, CLS dropped
    o = tiny_model.adapters(feats)
    assert set(o) == {"n_det", "n_seg", "ab_det", "ab_seg"}
    assert o["n_det"].shape == (4, 2, 289, 32)
    assert torch.allclose(o["ab_seg"].norm(dim=-1), torch.ones(4, 2, 289), atol=1e-5)  # rows L2-normalised
    out = tiny_model(x)
    assert out["score"].shape == (2,) and out["anomaly_map"].shape == (2, 1, 240, 240)
    assert out["score_map_max"].shape == (2,)
    assert torch.all(out["score"] > 0) and torch.all(out["score"] < 4)
    assert torch.allclose(out["score_map_max"], out["anomaly_map"].flatten(1).amax(1))


def test_default_taps_are_quarters_of_depth(tiny_model):
    from madclip_train.backbone import default_taps

    assert default_taps(24) == (5, 11, 17, 23)
    assert tiny_model.backbone.taps == (0, 1, 2, 3)


def test_adapter_parameter_count_for_vit_l_widths():
    from madclip_train.methods.madclip.adapters import DualAdapters

    n = sum(p.numel() for p in DualAdapters(1024, 768).parameters())
    assert n == 8 * (1024 * 1024 + 2 * 768 * 1024)  # about 21.0 M, as docs/METHODS.md §3 says
    assert abs(n / 1e6 - 21.0) < 0.1


def test_prompt_embeddings_are_unit_and_get_gradients(tiny_model):
    t_n, t_ab = tiny_model.text_embeddings()
    assert t_n.shape == (32,) and torch.isclose(t_n.norm(), torch.tensor(1.0), atol=1e-5)
    (t_ab - t_n).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.prompts.ctx.values())
    assert tiny_model.prompts.ctx["normal_middle"].shape == (7, 8, 64)
    assert all(not p.requires_grad for p in tiny_model.backbone.parameters())


def test_causal_switch_changes_text_embedding(tiny_cfg):
    from dataclasses import replace

    from madclip_train.model import build_model

    a = build_model(tiny_cfg, seed=0).text_embeddings()[0]
    b = build_model(replace(tiny_cfg, causal_prompt_mask=True), seed=0).text_embeddings()[0]
    assert not torch.allclose(a, b, atol=1e-4)


def test_closed_form_p_ab_equals_softmax_of_branch_scores():
    g = torch.Generator().manual_seed(0)
    o_n = F.normalize(torch.randn(5, 7, generator=g), dim=-1)
    o_ab = F.normalize(torch.randn(5, 7, generator=g), dim=-1)
    t_n = F.normalize(torch.randn(7, generator=g), dim=0)
    t_ab = F.normalize(torch.randn(7, generator=g), dim=0)
    s_n = o_n @ t_n - o_n @ t_ab  # docs/METHODS.md §5: S_n = O_n.t_n - O_n.t_ab
    s_ab = o_ab @ t_ab - o_ab @ t_n
    softmax_p = torch.softmax(torch.stack([s_n, s_ab], -1), -1)[:, 1]
    closed = torch.sigmoid((o_ab + o_n) @ (t_ab - t_n))
    assert torch.allclose(softmax_p, closed, atol=1e-6)
    got_n, got_ab = branch_logits(o_n, o_ab, t_ab - t_n)
    assert torch.allclose(got_n, s_n, atol=1e-6) and torch.allclose(got_ab, s_ab, atol=1e-6)
    assert torch.allclose(torch.sigmoid(got_ab - got_n), closed, atol=1e-6)


def test_score_head_ac_and_as():
    det = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[2.0, 2.0, 2.0, 2.0]]])  # [L=2, B=1, P=4]
    seg = torch.zeros(2, 1, 4)
    out = score_outputs(det, seg, 8)
    assert math.isclose(float(out["score"]), 0.5 + 1 / (1 + math.exp(-2)), rel_tol=1e-6)
    assert torch.allclose(out["anomaly_map"], torch.full((1, 1, 8, 8), 1.0))  # 2 layers x sigmoid(0)
    up = upsample_logits(torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]), 3)  # 2x2 -> 3x3, align_corners=True
    assert torch.allclose(up[0, 0], torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]))


def test_siglip_loss_hand_computed():
    s_n = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    s_ab = torch.tensor([[0.2, 0.4], [-1.0, 0.3]])
    y = torch.tensor([1, 0])

    def ls(v):
        return math.log(1 / (1 + math.exp(-v)))

    # image 0 (z=+1): mean log s(-S_n) + mean log s(S_ab); image 1 (z=-1): mean log s(S_n) + mean log s(-S_ab)
    img0 = (ls(-0.5) + ls(0.5)) / 2 + (ls(0.2) + ls(0.4)) / 2
    img1 = (ls(1.0) + ls(0.0)) / 2 + (ls(1.0) + ls(-0.3)) / 2
    expected = -(img0 + img1) / 2
    assert math.isclose(float(siglip_detection_loss(s_n, s_ab, y)), expected, rel_tol=1e-6)


def test_focal_and_dice_hand_computed():
    p = torch.tensor([[[0.9, 0.2], [0.4, 0.0]]])
    m = torch.tensor([[[True, False], [True, False]]])
    lo, hi = 1e-5, 1 - 1e-5
    pts = [
        hi * 0.9 + lo * 0.1 + 1e-5,
        lo * 0.2 + hi * 0.8 + 1e-5,
        hi * 0.4 + lo * 0.6 + 1e-5,
        lo * 0.0 + hi * 1.0 + 1e-5,
    ]
    focal = sum(-((1 - pt) ** 2) * math.log(pt) for pt in pts) / 4
    assert math.isclose(float(focal_loss(p, m)), focal, rel_tol=1e-5)
    dice = 1 - (2 * (0.9 + 0.4) + 1) / ((0.9 + 0.2 + 0.4) + 2 + 1)
    assert math.isclose(float(dice_loss(p, m)), dice, rel_tol=1e-6)
    empty = torch.zeros(1, 2, 2, dtype=torch.bool)  # a normal image with an empty mask is included
    assert math.isclose(float(dice_loss(p, empty)), 1 - 1 / (1.5 + 1), rel_tol=1e-6)


def test_madclip_loss_sums_layers_and_skips_seg_without_masks(tiny_model):
    feats = tiny_model.backbone(torch.rand(2, 3, 240, 240))
    t_n, t_ab = tiny_model.text_embeddings()
    logits = tiny_model.branch_logits(feats, t_ab - t_n)
    y = torch.tensor([0, 1])
    masks = torch.zeros(2, 240, 240, dtype=torch.bool)
    masks[1, 100:140, 100:140] = True
    full = madclip_loss(logits, y, masks, 240)
    det_only = madclip_loss(logits, y, None, 240)
    assert set(det_only) == {"det", "total"}
    assert torch.isclose(full["total"], full["det"] + full["focal"] + full["dice"])
    per_layer = sum(siglip_detection_loss(logits["det_n"][i], logits["det_ab"][i], y) for i in range(4))
    assert torch.isclose(full["det"], per_layer)


def test_causal_encoder_cut_after_last_eot_is_exact(tiny_cfg):
    """The causal variant encodes only up to the last EOT; that must equal encoding all 77 positions."""
    from dataclasses import replace

    from madclip_train.model import build_model

    model = build_model(replace(tiny_cfg, causal_prompt_mask=True), seed=0)
    p = model.prompts
    embeds = p.token_embedding(p.ids_abnormal)  # [21, 77, D]
    embeds = embeds + 0.1 * torch.randn_like(embeds)  # the context slots carry learned, non-token vectors
    assert int(p.eot_abnormal.max()) + 1 < embeds.shape[1]  # there is padding to cut
    cut = p.encoder(embeds, p.eot_abnormal)
    full = p.encoder(embeds, p.eot_abnormal, full_length=True)
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    # gradients to the context reach the same values through the shorter sequences
    ctx = torch.zeros_like(embeds, requires_grad=True)
    p.encoder(embeds + ctx, p.eot_abnormal).sum().backward()
    g_cut = ctx.grad.clone()
    ctx.grad = None
    p.encoder(embeds + ctx, p.eot_abnormal, full_length=True).sum().backward()
    g_full = ctx.grad
    # padding after the last EOT cannot reach any EOT output under the causal mask
    assert torch.all(g_full[:, int(p.eot_abnormal.max()) + 1 :] == 0)
    # the rest agrees up to float32 summation order (different matmul shapes)
    torch.testing.assert_close(g_cut, g_full, rtol=0, atol=1e-5 * float(g_full.abs().max()))
