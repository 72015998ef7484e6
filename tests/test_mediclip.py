"""MediCLIP as a method: training from normal scans only, selection on synthetic held-out samples, the CLIs end
to end on the real scans, the runtime reproducing PyTorch, and the authors' checkpoint format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from .conftest import realscans_or_skip

TINY = dict(backbone="madclip-tiny", pretrained="none", device="cpu")


def _normal_folder(path, n=4, size=96):
    """A folder holding nothing but normal scans (textured discs)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        disc = ((yy - size / 2) ** 2 + (xx - size / 2 - i) ** 2 < (0.38 * size) ** 2) * 110.0
        img = np.clip(30 + disc + rng.normal(0, 15, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"scan_{i}.png")
    return path


@pytest.fixture(scope="module")
def normals_run(tmp_path_factory):
    from madclip_train.run import TrainRequest, train_run

    base = tmp_path_factory.mktemp("medi")
    folder = _normal_folder(base / "normals")
    out = base / "run"
    summary = train_run(
        TrainRequest(data=str(folder), out=str(out), method="mediclip", shots=3, epochs=2, **TINY)
    )
    return out, folder, summary


def test_trains_from_a_folder_without_abnormal_images(normals_run):
    from madclip_train.rundir import load_run

    out, folder, summary = normals_run
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["method"] == "mediclip"
    assert (
        config["model"]["preprocess"]["image_size"] == 224
        and config["model"]["preprocess"]["normalize"] == "clip"
    )
    assert (
        config["model"]["preprocess"]["interpolation"] == "bilinear" and config["model"]["quick_gelu"] is True
    )
    assert config["train"]["batch_size"] == 8 and config["train"]["betas"] == [0.5, 0.999]
    shots = json.loads((out / "shots.json").read_text())
    assert shots["n_normal"] == 3 and shots["n_abnormal"] == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(np.isfinite(r["loss_focal"]) and np.isfinite(r["loss_dice"]) for r in log)
    model, _ = load_run(out)
    x = torch.from_numpy(np.stack([_clip_input(p) for p in sorted(folder.iterdir())[:2]]))
    with torch.no_grad():
        o = model(x)
    assert o["anomaly_map"].shape == (2, 1, 224, 224)
    assert float(o["anomaly_map"].min()) >= 0 and float(o["anomaly_map"].max()) <= 1
    torch.testing.assert_close(o["score"], o["anomaly_map"].flatten(1).amax(1))
    torch.testing.assert_close(o["score_map_max"], o["score"])


def _clip_input(path):
    from madclip_runtime.preprocess import PreprocessSpec, preprocess
    from madclip_runtime.scans.imageio import read_image

    return preprocess(
        read_image(path), PreprocessSpec(image_size=224, interpolation="bilinear", normalize="clip")
    )


def test_training_is_deterministic_and_synthesis_changes_every_epoch(tmp_path, normals_run):
    from madclip_train.run import TrainRequest, train_run

    out, folder, _ = normals_run
    again = tmp_path / "again"
    train_run(TrainRequest(data=str(folder), out=str(again), method="mediclip", shots=3, epochs=2, **TINY))
    from safetensors.torch import load_file

    a, b = load_file(again / "checkpoint.safetensors"), load_file(out / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["loss_total"] != log[1]["loss_total"]


def test_select_on_valid_scores_synthetic_held_out_samples(tmp_path):
    from madclip_train.run import TrainRequest, train_run

    folder = _normal_folder(tmp_path / "normals")  # no test/ folder: the test split cannot be used
    out = tmp_path / "run"
    summary = train_run(
        TrainRequest(
            data=str(folder), out=str(out), method="mediclip", shots=4, epochs=2, select_on="valid", **TINY
        )
    )
    shots = json.loads((out / "shots.json").read_text())
    assert len(shots["held_out"]) == 1 and summary["n_train_images"] == 3
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("val_total" in r and "val_image_auroc" in r for r in log)
    best = min(log, key=lambda r: r["val_total"])["epoch"]
    assert summary["selected_epoch"] == best
    assert summary["n_holdout_images"] == 8  # 8 fixed synthetic samples of the one held-out shot


def _run_cli(main, argv):
    return main(argv)


def test_cli_end_to_end_on_real_scans_and_runtime_matches_pytorch(tmp_path):
    from madclip_export.cli import main as export_main
    from madclip_runtime import predictor
    from madclip_runtime.cli.infer import main as infer_main
    from madclip_train.cli import eval_main, train_main
    from madclip_train.rundir import load_run

    root = realscans_or_skip("Brain_AD")
    run, bundle, results = tmp_path / "run", tmp_path / "bundle", tmp_path / "results"
    assert (
        train_main(
            [
                "--method",
                "mediclip",
                "--data",
                str(root),
                "--out",
                str(run),
                "--shots",
                "4",
                "--epochs",
                "2",
                "--backbone",
                "madclip-tiny",
                "--pretrained",
                "none",
            ]
        )
        == 0
    )
    shots = json.loads((run / "shots.json").read_text())
    assert shots["n_abnormal"] == 0 and all(s["path"].startswith("valid/good/img/") for s in shots["shots"])
    assert eval_main([str(run), "--data", str(root), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 <= metrics["image_auroc"] <= 1 and metrics["n_images"] > 0
    assert export_main([str(run), "--out", str(bundle), "--fp16", "--int8"]) == 0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["method"] == "mediclip"
    assert meta["preprocess"]["normalize"] == "clip" and meta["preprocess"]["image_size"] == 224
    assert meta["preprocess"]["interpolation"] == "bilinear"
    assert "synthetic" in meta["calibration"]["method"]
    assert np.isfinite(meta["calibration"]["threshold"])
    report = json.loads((bundle / "export_report.json").read_text())
    assert report["variants"]["fp32"]["vs_pytorch"]["anomaly_map"]["max_abs"] < 1e-4

    # the torch-free runtime, from the bundle's metadata alone, reproduces the PyTorch model
    scan = sorted((root / "test" / "Ungood" / "img").iterdir())[0]
    pred = predictor.load(bundle, backend="ort-cpu").predict_file(scan)[0]
    model, _ = load_run(run)
    with torch.no_grad():
        ref = model(torch.from_numpy(_clip_input(scan))[None])
    assert pred.score == pytest.approx(float(ref["score"][0]), abs=1e-5)
    np.testing.assert_allclose(pred.model_map, ref["anomaly_map"][0, 0].numpy(), atol=1e-5)
    assert infer_main(["--bundle", str(bundle), str(scan), "--out", str(results)]) == 0
    assert (results / f"{scan.stem}_overlay.png").is_file()


def _reference_checkpoint(model, seed=0):
    """A checkpoint in the layout the authors' train.py saves, for the tiny backbone's sizes."""
    g = torch.Generator().manual_seed(seed)
    ad, pr = {}, {}
    for i, a in enumerate(model.net.adapters):
        ad[f"{i}_adapter.0.weight"] = torch.randn(a.out_features, a.in_features, 1, 1, generator=g) * 0.1
        ad[f"{i}_adapter.0.bias"] = torch.randn(a.out_features, generator=g) * 0.1
    for k, p in model.net.prompts.ctx.items():
        pr[f"ctx.{k}"] = torch.randn(p.shape, generator=g) * 0.02
    return {"adapter_state_dict": ad, "prompt_state_dict": pr}


def test_convert_reference_checkpoint(tmp_path):
    from madclip_train.cli import convert_main
    from madclip_train.config import ModelConfig
    from madclip_train.model import build_model
    from madclip_train.rundir import load_run

    fresh = build_model(
        ModelConfig(
            method="mediclip", backbone="madclip-tiny", pretrained="none", quick_gelu=True, preprocess=_spec()
        )
    )
    ref = _reference_checkpoint(fresh)
    pkl = tmp_path / "checkpoints_12.pkl"
    torch.save(ref, pkl)
    out = tmp_path / "ref_run"
    assert (
        convert_main(
            [
                str(pkl),
                "--method",
                "mediclip",
                "--out",
                str(out),
                "--backbone",
                "madclip-tiny",
                "--pretrained",
                "none",
            ]
        )
        == 0
    )
    model, _ = load_run(out)
    # the reference's computation with its own tensors: 1x1 conv adapters, L2, T, layer mean, upsample, softmax
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        taps = model.net.taps(x)  # [3, B, P, W]
        t = model.net.prompts()  # [E, 2], from the converted context vectors
        maps = []
        for i, f in enumerate(taps):
            grid = f.transpose(1, 2).reshape(2, -1, 16, 16)  # [B, W, 16, 16]
            v = F.conv2d(
                grid,
                ref["adapter_state_dict"][f"{i}_adapter.0.weight"],
                ref["adapter_state_dict"][f"{i}_adapter.0.bias"],
            )
            v = v.permute(0, 2, 3, 1)
            v = v / v.norm(dim=-1, keepdim=True)
            maps.append((v.reshape(2, 256, -1) @ t).reshape(2, 16, 16, 2).permute(0, 3, 1, 2))
        expected = torch.softmax(
            F.interpolate(torch.stack(maps).mean(0), (224, 224), mode="bilinear", align_corners=True), dim=1
        )[:, 1]
        got = model(x)["anomaly_map"][:, 0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.net.prompts.ctx["abnormal_end"], ref["prompt_state_dict"]["ctx.abnormal_end"]
    )


def _spec():
    from madclip_runtime.preprocess import PreprocessSpec

    return PreprocessSpec(image_size=224, interpolation="bilinear", normalize="clip")
