"""MVFA on the tiny config: write-back, cache boundary, losses, bank, normalisers, augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from madclip_train.methods.mvfa import MVFAModel
from madclip_train.methods.mvfa.augment import augment_x11
from madclip_train.methods.mvfa.losses import det_loss, seg_losses
from madclip_train.methods.mvfa.scores import few_shot, nearest_distance, transductive_mix
from madclip_train.methods.mvfa.text import TEMPLATES, ensemble_sentences


class _Source:
    """What finalize() reads from the trainer's training source: images, labels, masks, groups."""

    def __init__(self, images, labels, masks, groups):
        self.images, self.labels, self.masks, self.groups = images, labels, masks, groups

    def __len__(self):
        return len(self.labels)


@pytest.fixture()
def mvfa(tiny_cfg):
    model = MVFAModel.build(tiny_cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial adapters so the write-back matters
        for p in list(model.tower.seg.parameters()) + list(model.tower.det.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _images(n, seed=0):
    return torch.rand(n, 3, 240, 240, generator=torch.Generator().manual_seed(seed))


def test_text_ensemble_sizes():
    s = ensemble_sentences("Brain")
    assert len(TEMPLATES) == 35 and len(set(TEMPLATES)) == 35
    assert len(s["normal"]) == 245 and len(s["abnormal"]) == 175
    assert (
        "a photo of the small Brain with flaw." in s["abnormal"]
        and "this is one flawless Brain in the scene." in s["normal"]
    )


def test_write_back_changes_later_layers(mvfa):
    x = _images(2)
    seg0, det0 = mvfa.tower(x)
    with torch.no_grad():
        mvfa.tower.seg[0].fc2.weight.mul_(3.0)  # only the first tap's written-back output changes
        seg1, det1 = mvfa.tower(x)
    assert torch.equal(seg0[0], seg1[0]) and torch.equal(det0[0], det1[0])  # taken before the write-back
    for layer in (1, 2, 3):
        assert (seg0[layer] - seg1[layer]).abs().max() > 1e-3
        assert (det0[layer] - det1[layer]).abs().max() > 1e-3


def test_prefix_cache_equals_uncached_forward(mvfa):
    x = _images(2, seed=3)
    # the boundary is the raw stream after the first tapped block, identical to open_clip's own intermediate
    ref = mvfa.tower.visual.forward_intermediates(
        x,
        indices=[mvfa.tower.taps[0]],
        intermediates_only=True,
        normalize_intermediates=False,
        output_fmt="NLC",
    )
    cached = mvfa.cacheable(x)
    assert torch.allclose(cached[:, 1:], ref["image_intermediates"][0], atol=1e-5)
    seg_c, det_c = mvfa.tower.suffix(cached)
    seg_u, det_u = mvfa.tower(x)
    assert torch.equal(seg_c, seg_u) and torch.equal(det_c, det_u)
    # and a fp16-rounded cache (what training stores) changes the losses only by rounding
    feats16 = cached.half().float()
    la = mvfa.loss(cached, torch.tensor([1, 0]), None)["total"]
    lb = mvfa.loss(feats16, torch.tensor([1, 0]), None)["total"]
    assert abs(float(la.detach()) - float(lb.detach())) < 1e-2


def _mids_with_probs(p_ab: float, n_layers=4, n_patch=4, e=2):
    """mids whose every patch gives softmax(100 f.T)_ab == p_ab exactly, with T = identity columns."""
    d = math.log(p_ab / (1 - p_ab)) / 100.0  # f.t_ab - f.t_n
    # unit f = (c, s) with s - c = d
    c = (-d + math.sqrt(2 - d * d)) / 2
    s = c + d
    f = torch.tensor([c, s]).repeat(n_layers, 1, 1 + n_patch, 1)  # [L, 1, 1+P, 2]
    return f, torch.eye(2)


def test_det_loss_reproduces_bce_on_probability_quirk():
    for p, y in ((0.9, 1), (0.2, 0), (0.999999, 1)):
        mids, text = _mids_with_probs(p)
        got = float(det_loss(mids, text, torch.tensor([y]), "bce_on_prob"))
        sig = 1 / (1 + math.exp(-p))  # sigmoid of a probability
        hand = -(y * math.log(sig) + (1 - y) * math.log(1 - sig))
        assert got == pytest.approx(4 * hand, rel=1e-4)
        clean = float(det_loss(mids, text, torch.tensor([y]), "bce"))
        assert p > 0.99 or clean == pytest.approx(
            4 * -(y * math.log(p) + (1 - y) * math.log(1 - p)), rel=1e-3
        )
    # the quirk's floor: even a perfect abnormal prediction costs softplus(-1) = 0.3133 per layer
    mids, text = _mids_with_probs(0.999999)
    assert float(det_loss(mids, text, torch.tensor([1]))) > 4 * 0.313


def test_seg_losses_hand_computed():
    mids, text = _mids_with_probs(0.7, n_patch=4)  # constant map p_ab = 0.7 after upsampling
    masks = torch.zeros(1, 240, 240)
    masks[0, :120] = 1
    focal, dice = seg_losses(mids, text, masks, 240)
    frac = 0.5
    pt_ab, pt_n = 0.7 * (1 - 1e-5) + 0.3 * 1e-5 + 1e-5, 0.3 * (1 - 1e-5) + 0.7 * 1e-5 + 1e-5
    hand_focal = frac * -((1 - pt_ab) ** 2) * math.log(pt_ab) + (1 - frac) * -((1 - pt_n) ** 2) * math.log(
        pt_n
    )
    inter, psum, msum = 0.7 * 120 * 240, 0.7 * 240 * 240, 120 * 240
    hand_dice = 1 - (2 * inter + 1) / (psum + msum + 1)
    assert float(focal) == pytest.approx(4 * hand_focal, rel=1e-4)
    assert float(dice) == pytest.approx(4 * hand_dice, rel=1e-4)


def test_memory_bank_distance_matches_brute_force_numpy():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 8, generator=g)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    exclude = torch.zeros(2, 30, dtype=torch.bool)
    exclude[0, :10] = True
    got = nearest_distance(q, bank, exclude).numpy()
    qn, bn = q.numpy(), bank.numpy()
    for b in range(2):
        for p in range(9):
            best = min(
                1 - float(np.dot(qn[b, p], bn[r]) / np.linalg.norm(qn[b, p]) / np.linalg.norm(bn[r]))
                for r in range(30)
                if not exclude[b, r]
            )
            assert got[b, p] == pytest.approx(best, abs=1e-5)


def test_normalisers_use_training_views_only_and_are_cross_fitted(mvfa):
    shots = _images(3, seed=4)
    masks = torch.zeros(3, 240, 240, dtype=torch.bool)
    masks[0, 100:140, 100:140] = True
    imgs, ms, src = augment_x11(shots, masks)
    labels = torch.tensor([1, 0, 0])[src]
    mvfa.set_has_masks(True)
    mvfa.finalize(_Source(imgs, labels, ms, src), "cpu")
    # brute force: bank from normal views; F of normal views excludes their own shot
    with torch.no_grad():
        mids = mvfa.head_mids(mvfa.cacheable(imgs))  # [L, 33, 290, E]
        normal = torch.nonzero(labels == 0).flatten()
        bank = torch.nn.functional.normalize(mids[:, normal].reshape(4, -1, mids.shape[-1]), dim=-1)
        assert torch.allclose(bank, mvfa.bank, atol=1e-6)
        row_src = src[normal].repeat_interleave(290)
        fmax = []
        for i in range(imgs.shape[0]):
            excl = (row_src == src[i]) & (labels[i] == 0)
            fmap, _ = few_shot(mids[:, i : i + 1], bank, 240, excl[None])
            fmax.append(float(fmap.max()))
            if labels[i] == 0:  # against the full bank a normal view would find itself: distance ~0
                full, _ = few_shot(mids[:, i : i + 1], bank, 240)
                assert float(full.max()) < 1e-4 < float(fmap.max())
    assert 1.0 / float(mvfa.norm_scale[1]) + float(mvfa.norm_lo[1]) == pytest.approx(max(fmax), rel=1e-5)
    # inductive: an image's outputs do not depend on the other images scored with it (no test-set statistics)
    test = _images(4, seed=9)
    with torch.no_grad():
        together = mvfa(test)
        alone = mvfa(test[2:3])
    assert torch.allclose(together["anomaly_map"][2:3], alone["anomaly_map"], atol=1e-5)
    assert torch.allclose(together["score"][2:3], alone["score"], atol=1e-6)


def test_finalize_needs_two_normal_shots(mvfa):
    from madclip_runtime.errors import MadclipError

    imgs, ms, src = augment_x11(_images(2), torch.zeros(2, 240, 240, dtype=torch.bool))
    with pytest.raises(MadclipError, match="2 normal shots"):
        mvfa.finalize(_Source(imgs, torch.tensor([1, 0])[src], ms, src), "cpu")


def test_image_only_quirk_trains_det_only_but_writes_seg_back(mvfa):
    params = mvfa.trainable_parameters(has_masks=False)
    ids = {id(p) for p in params}
    assert all(id(p) in ids for p in mvfa.tower.det.parameters())
    assert not any(id(p) in ids for p in mvfa.tower.seg.parameters())
    assert mvfa.tower.seg_write_back  # random seg adapters still feed the stream
    mvfa.options["image_only_seg"] = "off"
    mvfa.trainable_parameters(has_masks=False)
    assert not mvfa.tower.seg_write_back


def test_transductive_mix_is_the_reference_min_max():
    z = np.array([1.0, 2.0, 3.0])
    f = np.array([0.0, 10.0, 5.0])
    assert np.allclose(transductive_mix(z, f), [0.0, 0.75, 0.75])


def test_augment_x11_views():
    img = _images(2, seed=5)
    m = torch.zeros(2, 240, 240, dtype=torch.bool)
    m[:, 100:140, 80:120] = True
    out, om, src = augment_x11(img, m)
    assert out.shape == (22, 3, 240, 240) and src.tolist() == [0] * 11 + [1] * 11
    assert torch.equal(out[0], img[0]) and torch.equal(out[11], img[1])
    assert torch.equal(out[9], torch.flip(img[0], dims=(2,))) and torch.equal(
        om[10], torch.flip(m[0], dims=(0,))
    )
    # translation (+0.1, +0.1) samples the input 12 px right/down: the mask moves up-left by 12 px
    ys, xs = torch.nonzero(om[5], as_tuple=True)
    assert abs(int(ys.min()) - (100 - 12)) <= 1 and abs(int(xs.min()) - (80 - 12)) <= 1
    assert abs(int(ys.max()) - (139 - 12)) <= 1 and abs(int(xs.max()) - (119 - 12)) <= 1


def _authors_checkpoint(model, path):
    """A synthetic checkpoint in MVFA-AD's format: {'seg_adapters': {j.fc1.0.weight, j.fc2.0.weight}, 'det_adapters': ...}."""
    g = torch.Generator().manual_seed(7)
    ref = {}
    for head, mods in (("seg", model.tower.seg), ("det", model.tower.det)):
        ref[f"{head}_adapters"] = {
            f"{j}.{fc}.0.weight": torch.randn(getattr(m, fc).weight.shape, generator=g)
            for j, m in enumerate(mods)
            for fc in ("fc1", "fc2")
        }
    torch.save(ref, path)
    return ref


def test_convert_reference_round_trip(mvfa, tmp_path):
    ref = _authors_checkpoint(mvfa, tmp_path / "Brain.pth")
    loaded = torch.load(tmp_path / "Brain.pth", map_location="cpu", weights_only=True)
    state = MVFAModel.convert_reference(loaded)
    mvfa.load_adapters(state, "Brain.pth")
    assert torch.equal(mvfa.tower.seg[2].fc1.weight, ref["seg_adapters"]["2.fc1.0.weight"])
    assert torch.equal(mvfa.tower.det[3].fc2.weight, ref["det_adapters"]["3.fc2.0.weight"])
    from madclip_runtime.errors import MadclipError

    del loaded["det_adapters"]["1.fc2.0.weight"]
    with pytest.raises(MadclipError, match="det_adapters.1.fc2.0.weight"):
        MVFAModel.convert_reference(loaded)
    with pytest.raises(MadclipError, match="seg_adapters"):
        MVFAModel.convert_reference({"normal_det_adapters": {}})
