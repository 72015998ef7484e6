"""APRIL-GAN (--method aprilgan) on the tiny config and generated data, then end to end on the real scans:
build -> loss and backward -> outputs -> checkpoint round trip -> export FP32 parity -> runtime predict parity ->
the authors' checkpoint format -> convert -> export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from madclip_runtime.errors import MadclipError
from madclip_runtime.preprocess import PreprocessSpec
from madclip_train.config import ModelConfig
from madclip_train.methods.aprilgan.bank import bank_from_taps
from madclip_train.methods.aprilgan.losses import aprilgan_loss
from madclip_train.methods.aprilgan.model import AprilGANModel
from madclip_train.methods.aprilgan.scores import (
    few_shot_map,
    layer_logits,
    patch_distances,
    text_probability,
    transductive_score,
)
from madclip_train.methods.aprilgan.text import TEMPLATES, ensemble_sentences
from tests.conftest import eval_fixed_and_transductive, realscans_or_skip

S = 84  # 6 x 6 patches of the tiny tower: fast, and the upsampling is not an identity
TINY = ["--backbone", "madclip-tiny", "--pretrained", "none", "--device", "cpu"]


class _Source:
    """What finalize() reads from a training source."""

    def __init__(self, images, labels, groups=None, originals=None):
        n = len(labels)
        self.images, self.labels = images, labels
        self.groups = torch.arange(n) if groups is None else groups
        self.originals = torch.ones(n, dtype=torch.bool) if originals is None else originals

    def __len__(self):
        return len(self.labels)


def _cfg(**options) -> ModelConfig:
    return ModelConfig(
        method="aprilgan",
        backbone="madclip-tiny",
        pretrained="none",
        objective="Brain",
        preprocess=PreprocessSpec(image_size=S, normalize="clip"),
        options=options,
    )


@pytest.fixture()
def model():
    m = AprilGANModel.build(_cfg(), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.linear.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _images(n, seed=0):
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _masks(n):
    m = torch.zeros(n, S, S, dtype=torch.bool)
    m[n // 2 :, 20:50, 30:60] = True
    return m


def test_prompt_ensemble():
    s = ensemble_sentences("Brain")
    assert len(TEMPLATES) == 35 and len(s["normal"]) == 245 and len(s["abnormal"]) == 175
    assert (
        s["normal"][0] == "a bad photo of a Brain."
        and s["abnormal"][-1] == "this is one Brain with damage in the scene."
    )


def test_taps_and_image_embedding_match_open_clip(model):
    """The tower's taps are open_clip's raw intermediates (CLS included) and its image embedding CLIP's."""
    import torch.nn.functional as F

    x = _images(2)
    taps = model.cacheable(x)
    assert taps.shape == (2, 4, 1 + 36, 64)
    inter = model.tower.visual.forward_intermediates(
        x,
        indices=list(model.tower.taps),
        intermediates_only=False,
        normalize_intermediates=False,
        output_fmt="NLC",
        output_extra_tokens=True,
    )
    for j in range(4):
        assert torch.allclose(taps[:, j, 1:], inter["image_intermediates"][j], atol=1e-6)
        assert torch.allclose(taps[:, j, :1], inter["image_intermediates_prefix"][j], atol=1e-6)
    emb = F.normalize(model.tower.visual(x), dim=-1)
    p = torch.softmax(100 * emb @ model.text, dim=-1)[:, 1]
    assert torch.allclose(text_probability(taps, model.tower.visual, model.text), p, atol=1e-6)


def test_loss_finite_backward_reaches_linear_layers_only(model):
    x, labels = _images(4), torch.tensor([0, 0, 1, 1])
    parts = model.loss(model.cacheable(x), labels, _masks(4))
    assert set(parts) == {"focal", "dice", "total"} and all(torch.isfinite(v) for v in parts.values())
    parts["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.linear.parameters())
    assert all(p.grad is None for p in model.tower.visual.parameters())
    # datasets without masks: an abnormal shot counts as abnormal everywhere
    no_masks = model.loss(model.cacheable(x), labels, None)["total"]
    full = model.loss(model.cacheable(x), labels, labels.bool()[:, None, None].expand(-1, S, S))["total"]
    assert torch.allclose(no_masks, full)


def test_loss_hand_computed():
    """Focal (both channels, clamped one-hot, gamma 2) + Dice (smooth 1, per image) against numpy."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 2, generator=g) * 3  # [L, B, P=2x2, 2]
    masks = torch.rand(3, 6, 6, generator=g) > 0.6
    parts = aprilgan_loss(logits, masks, 6)
    lg = logits.numpy().astype(np.float64)
    focal = dice = 0.0
    for j in range(2):
        up = torch.nn.functional.interpolate(
            torch.from_numpy(lg[j]).permute(0, 2, 1).reshape(3, 2, 2, 2),
            size=6,
            mode="bilinear",
            align_corners=True,
        ).numpy()
        pr = np.exp(up) / np.exp(up).sum(1, keepdims=True)
        m = masks.numpy().astype(np.float64)
        onehot = np.clip(np.stack([1 - m, m], 1), 1e-5, 1 - 1e-5)
        pt = (onehot * pr).sum(1) + 1e-5
        focal += np.mean(-((1 - pt) ** 2) * np.log(pt))
        inter = (pr[:, 1] * m).reshape(3, -1).sum(1)
        dice += 1 - np.mean((2 * inter + 1) / (pr[:, 1].reshape(3, -1).sum(1) + m.reshape(3, -1).sum(1) + 1))
    assert abs(float(parts["focal"]) - focal) < 1e-5 and abs(float(parts["dice"]) - dice) < 1e-5


def test_memory_bank_distance_matches_brute_force(model):
    taps_bank, taps_q = model.cacheable(_images(2, 1)), model.cacheable(_images(3, 2))
    bank = bank_from_taps(taps_bank)
    assert bank.shape == (4, 2 * 36, 64)
    d = patch_distances(taps_q, bank).numpy()
    for j in range(4):
        q = taps_q[:, j, 1:].numpy().astype(np.float64)
        b = taps_bank[:, j, 1:].reshape(-1, 64).numpy().astype(np.float64)
        cos = (q / np.linalg.norm(q, axis=-1, keepdims=True)) @ (
            b / np.linalg.norm(b, axis=-1, keepdims=True)
        ).T
        assert np.abs(d[j] - (1 - cos).min(-1)).max() < 1e-5
    # an image in the bank has distance 0 to itself
    assert patch_distances(taps_bank, bank).abs().max() < 1e-5


def test_finalize_bank_from_normal_originals_and_cross_fitted_normalisers(model):
    x, labels = _images(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])
    originals = torch.tensor([True, False, True, True, True, True])  # image 1: an augmented view of shot 0
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    info = model.finalize(_Source(x, labels, groups, originals), torch.device("cpu"))
    assert info["bank_shots"] == 2 and model.bank.shape == (4, 2 * 36, 64)
    # the normalisers: min/max of max A over the training images, each normal one without its own shot's rows
    taps = model.cacheable(x)
    zmap = model.raw_scores(taps)["map"] - few_shot_map(patch_distances(taps, model.bank), S)
    rows = torch.tensor([0, 2]).repeat_interleave(36)
    exclude = (groups[:, None] == rows[None]) & (labels[:, None] == 0)
    amax = (zmap + few_shot_map(patch_distances(taps, model.bank, exclude), S)).flatten(1).amax(1)
    assert torch.allclose(model.norm_lo, amax.min().reshape(1), atol=1e-5)
    assert torch.allclose(1 / model.norm_scale, (amax.max() - amax.min()).reshape(1), atol=1e-4)
    with pytest.raises(MadclipError, match="at least 2 normal shots"):
        AprilGANModel.build(_cfg(), seed=0).finalize(_Source(x[2:], labels[2:]), torch.device("cpu"))


def test_outputs_scores_and_ranges(model):
    x, labels = _images(4, 5), torch.tensor([0, 0, 1, 1])
    model.finalize(_Source(x, labels), torch.device("cpu"))
    q = model.cacheable(_images(3, 6))
    with torch.no_grad():
        out, r = model.outputs(q), model.raw_scores(q)
    assert (
        out["score"].shape == (3,)
        and out["anomaly_map"].shape == (3, 1, S, S)
        and out["score_map_max"].shape == (3,)
    )
    lo, hi = model.output_ranges()["anomaly_map"]
    assert (
        (lo, hi) == (0.0, 12.0)
        and float(out["anomaly_map"].min()) >= lo
        and float(out["anomaly_map"].max()) <= hi
    )
    expect = 0.5 * (r["p"] + (r["max"] - model.norm_lo) * model.norm_scale)
    assert torch.allclose(out["score"], expect) and torch.allclose(out["score_map_max"], r["max"])
    zmap = layer_logits(q, model.linear, model.text)  # [L, B, P, 2]: Z is the sum of 4 probabilities
    assert float(r["map"].max()) <= 4.0 + 8.0 and zmap.shape == (4, 3, 36, 2)
    # the reference's transductive score: min-max of max A over the scored set
    p, amax = r["p"].numpy(), r["max"].numpy()
    t = transductive_score(p, amax)
    assert np.allclose(t, 0.5 * (p + (amax - amax.min()) / (amax.max() - amax.min())))


def test_zero_shot_option_and_unknown_option():
    m = AprilGANModel.build(_cfg(few_shot=False), seed=0)
    info = m.finalize(_Source(_images(4), torch.tensor([0, 0, 1, 1])), torch.device("cpu"))
    assert "zero-shot" in info["mode"] and m.bank.shape[1] == 0
    taps = m.cacheable(_images(2))
    out = m.outputs(taps)
    assert torch.allclose(out["score"], text_probability(taps, m.tower.visual, m.text))
    assert m.output_ranges()["anomaly_map"] == (0.0, 4.0)
    with pytest.raises(MadclipError, match="has no such option"):
        AprilGANModel.build(_cfg(bogus=1), seed=0)


def test_checkpoint_round_trip_and_export_fp32_parity(model):
    x, labels = _images(4, 7), torch.tensor([0, 0, 1, 1])
    model.finalize(_Source(x, labels), torch.device("cpu"))
    q = _images(2, 8)
    ref = model(q)
    other = AprilGANModel.build(_cfg(), seed=9)
    other.load_trainable_state(model.trainable_state(), "test")
    got = other(q)
    for k in ref:
        assert torch.equal(ref[k], got[k])
    score, amap, amax = other.export_module()(q)
    assert torch.allclose(score, ref["score"], atol=1e-6) and torch.allclose(
        amap, ref["anomaly_map"], atol=1e-5
    )
    bad = dict(model.trainable_state())
    bad["linear.0.weight"] = bad["linear.0.weight"][:3]
    with pytest.raises(MadclipError, match="linear.0.weight has shape"):
        other.load_trainable_state(bad, "ckpt")


def _authors_checkpoint(path, width=64, embed=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(4):
        sd[f"fc.{i}.weight"] = torch.randn(embed, width, generator=g) * 0.1
        sd[f"fc.{i}.bias"] = torch.randn(embed, generator=g) * 0.1
    torch.save({"trainable_linearlayer": sd}, path)
    return sd


def test_convert_reference_format_and_errors(tmp_path):
    sd = _authors_checkpoint(tmp_path / "mvtec.pth")
    state = AprilGANModel.convert_reference(torch.load(tmp_path / "mvtec.pth", weights_only=True))
    assert torch.equal(state["linear.2.bias"], sd["fc.2.bias"]) and len(state) == 8
    with pytest.raises(MadclipError, match="lacks trainable_linearlayer.fc.3.weight"):
        AprilGANModel.convert_reference(
            {"trainable_linearlayer": {k: v for k, v in sd.items() if "3" not in k}}
        )


@pytest.mark.realdata
def test_convert_reference_few_and_zero_shot_then_export(tmp_path, capsys):
    from safetensors.torch import load_file

    from madclip_export.cli import main as export_main
    from madclip_train.cli import convert_main
    from madclip_train.rundir import load_run

    data = realscans_or_skip("Brain_AD")
    sd = _authors_checkpoint(tmp_path / "mvtec.pth")
    common = [
        "--method",
        "aprilgan",
        "--objective",
        "Brain",
        "--backbone",
        "madclip-tiny",
        "--pretrained",
        "none",
        "--image-size",
        str(S),
    ]
    few = tmp_path / "few"
    assert (
        convert_main(
            [str(tmp_path / "mvtec.pth"), *common, "--data", str(data), "--shots", "2", "--out", str(few)]
        )
        == 0
    )
    state = load_file(str(few / "checkpoint.safetensors"))
    assert torch.equal(state["linear.1.weight"], sd["fc.1.weight"]) and torch.equal(
        state["linear.2.bias"], sd["fc.2.bias"]
    )
    assert state["aprilgan.bank"].shape == (4, 2 * 36, 64)  # 2 normal shots x 6 x 6 patches
    config = json.loads((few / "config.json").read_text())
    assert config["dataset"]["has_masks"] and config["finalize"]["bank_shots"] == 2
    model, _ = load_run(few)
    assert model.few_shot
    # without --data: the reference's zero-shot mode
    zero = tmp_path / "zero"
    assert convert_main([str(tmp_path / "mvtec.pth"), *common, "--out", str(zero)]) == 0
    model, _ = load_run(zero)
    assert not model.few_shot and torch.equal(model.linear[3].bias.detach(), sd["fc.3.bias"])
    assert export_main([str(few), "--out", str(tmp_path / "bundle")]) == 0
    # a file that is not APRIL-GAN's: one line, nothing written
    torch.save({"seg_adapters": {}}, tmp_path / "other.pth")
    capsys.readouterr()
    assert convert_main([str(tmp_path / "other.pth"), *common, "--out", str(tmp_path / "bad")]) == 2
    assert "trainable_linearlayer" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# ---- end to end through the CLIs on the real scans ------------------------------------------------------------------
@pytest.fixture(scope="module")
def aprilgan_run(tmp_path_factory):
    from madclip_train.cli import train_main

    data = realscans_or_skip("Brain_AD")
    out = tmp_path_factory.mktemp("aprilgan") / "run"
    assert (
        train_main(
            [
                "--method",
                "aprilgan",
                "--data",
                str(data),
                "--shots",
                "2",
                "--epochs",
                "2",
                "--image-size",
                str(S),
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    return data, out


@pytest.mark.realdata
def test_train_records_reference_defaults_bank_and_normalisers(aprilgan_run):
    from safetensors.torch import load_file

    data, run = aprilgan_run
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "aprilgan" and config["model"]["preprocess"]["normalize"] == "clip"
    assert config["train"]["batch_size"] == 8 and tuple(config["train"]["betas"]) == (0.5, 0.999)
    assert config["finalize"]["bank_shots"] == 2 and config["finalize"]["normaliser_images"] == 4
    state = load_file(str(run / "checkpoint.safetensors"))
    assert state["aprilgan.bank"].shape == (4, 2 * 36, 64)
    assert torch.allclose(state["aprilgan.bank"].norm(dim=-1), torch.ones(1), atol=1e-5)
    shots = json.loads((run / "shots.json").read_text())
    assert all("/valid/" in "/" + s["path"] for s in shots["shots"])


@pytest.mark.realdata
def test_eval_fixed_and_transductive(aprilgan_run, tmp_path):
    from madclip_train.data import load_split
    from madclip_train.evaluate import predict_split
    from madclip_train.rundir import load_run

    data, run = aprilgan_run
    f, t = eval_fixed_and_transductive(run, data, tmp_path)
    assert f["n_images"] == t["n_images"] == 19 and t["normalisation"].startswith("transductive")
    # the transductive score is the reference's formula over the test set's raw values
    model, _ = load_run(run)
    split = load_split(str(data), "test")
    pred = model.predict_transductive(split, device="cpu")
    fixed_pred = predict_split(model, split, device="cpu")
    amax = fixed_pred["score_map_max"].astype(np.float64)
    p = 2 * fixed_pred["score"] - (amax - float(model.norm_lo)) * float(model.norm_scale)
    assert np.allclose(pred["score"], transductive_score(p, amax), atol=1e-5)


@pytest.mark.realdata
def test_export_fp16_int8_and_infer_parity(aprilgan_run, tmp_path, capsys):
    import onnx

    from madclip_export.cli import main as export_main
    from madclip_runtime.cli.infer import main as infer_main
    from madclip_train.data import load_split
    from madclip_train.evaluate import predict_split
    from madclip_train.rundir import load_run

    data, run = aprilgan_run
    bundle = tmp_path / "bundle"
    assert export_main([str(run), "--out", str(bundle), "--fp16", "--int8"]) == 0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["method"] == "aprilgan" and meta["provenance"]["aprilgan_mode"] == "few-shot"
    names = {
        i.name for i in onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.initializer
    }
    assert {"bank_0", "bank_3", "text", "norm_lo", "norm_scale"} <= names
    fp16 = onnx.load(str(bundle / "model_fp16.onnx"), load_external_data=False)
    kinds = {i.name: i.data_type for i in fp16.graph.initializer}
    assert kinds["bank_0"] == onnx.TensorProto.FLOAT16 and kinds["text"] == onnx.TensorProto.FLOAT
    assert infer_main(["--bundle", str(bundle), "--selftest"]) == 0
    split = load_split(str(data), "test")
    capsys.readouterr()
    assert infer_main([split.abnormal[0].path, "--bundle", str(bundle), "--json"]) == 0
    rec = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    model, _ = load_run(run)
    sub = type(split)(split.root, split.name, (), split.abnormal[:1], split.has_masks)
    ref = predict_split(model, sub, device="cpu")
    assert len(rec) == 1 and abs(rec[0]["score"] - float(ref["score"][0])) < 1e-4
    assert abs(rec[0]["score_map_max"] - float(ref["score_map_max"][0])) < 1e-3


@pytest.mark.realdata
def test_zero_shot_option_through_the_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    from madclip_train.cli import train_main

    data = realscans_or_skip("Brain_AD")
    out = tmp_path / "run"
    common = [
        "--method",
        "aprilgan",
        "--data",
        str(data),
        "--shots",
        "2",
        "--epochs",
        "1",
        "--image-size",
        str(S),
    ]
    assert train_main([*common, "--option", "few_shot=false", "--out", str(out), *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["options"] == {"few_shot": False} and "zero-shot" in config["finalize"]["mode"]
    assert load_file(str(out / "checkpoint.safetensors"))["aprilgan.bank"].shape == (4, 0, 64)
    assert train_main([*common, "--option", "few_shot=maybe", "--out", str(tmp_path / "bad"), *TINY]) == 2
    assert "few_shot" in capsys.readouterr().err and not (tmp_path / "bad").exists()
