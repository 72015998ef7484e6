"""Trainer: feature-cache equivalence, model selection, checkpoints, real-data learning, CLI end to end."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from madclip_train.config import TrainConfig
from madclip_train.data import load_arrays, load_split, sample_shots
from madclip_train.demo import generate_demo
from madclip_train.methods.madclip import MadCLIP
from madclip_train.reference import load_reference_checkpoint
from madclip_train.rundir import load_run
from madclip_train.train import ShotTensors, fit

from .conftest import fake_reference_checkpoint, realscans_or_skip

TINY = ["--backbone", "madclip-tiny", "--pretrained", "none"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_valid=4, n_test=4, seed=3)


def _shots(root: Path, k: int = 2) -> ShotTensors:
    split = load_split(root, "valid")
    images, masks, labels = load_arrays(sample_shots(split, k, 111))
    return ShotTensors(torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(labels))


def _fit(tiny_cfg, shots, tcfg, tmp_path=None):
    from madclip_train.model import build_model

    torch.manual_seed(tcfg.seed)
    model = build_model(tiny_cfg, seed=tcfg.seed)
    summary = fit(model, shots, True, tcfg, torch.device("cpu"), cache_dir=tmp_path)
    return model, summary


def test_cached_and_uncached_training_agree(tiny_cfg, demo_root, tmp_path):
    shots = _shots(demo_root)
    base = TrainConfig(shots=2, epochs=2, batch_size=8, seed=7)
    cached, s1 = _fit(tiny_cfg, shots, replace(base, feature_cache="memory"))
    uncached, s2 = _fit(tiny_cfg, shots, replace(base, feature_cache="off"))
    disk, s3 = _fit(tiny_cfg, shots, replace(base, feature_cache="disk"), tmp_path)
    disk_again, s4 = _fit(tiny_cfg, shots, replace(base, feature_cache="disk"), tmp_path)
    assert s3["cache"]["train"]["hit"] is False and s4["cache"]["train"]["hit"] is True
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    ref = cached.trainable_state()
    for other in (uncached, disk, disk_again):
        got = other.trainable_state()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=2e-5, rtol=1e-4)
    for a, b in zip(s1["history"], s2["history"]):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-4)
    assert s1["history"][-1]["loss_total"] != s1["history"][0]["loss_total"]  # it did train


def test_select_on_valid_holds_out_shots_and_keeps_best_epoch(tiny_cfg, demo_root):
    shots = _shots(demo_root, k=4)
    model, summary = _fit(
        tiny_cfg,
        shots,
        TrainConfig(shots=4, epochs=3, batch_size=16, select_on="valid", holdout_fraction=0.25, seed=1),
    )
    assert len(summary["holdout_index"]) == 2  # one per class
    assert summary["n_train_images"] == 16 * 6 and summary["n_holdout_images"] == 16 * 2
    losses = [h["val_total"] for h in summary["history"]]
    assert summary["selected_epoch"] == 1 + int(np.argmin(losses))


def test_checkpoint_round_trip_reproduces_outputs(demo_root, tmp_path):
    from madclip_train.cli import train_main

    run = tmp_path / "run"
    assert (
        train_main(["--data", str(demo_root), "--out", str(run), "--shots", "2", "--epochs", "1", *TINY]) == 0
    )
    model, config = load_run(run)
    again, _ = load_run(run)
    x = torch.rand(2, 3, 240, 240)
    with torch.no_grad():
        a, b = model(x), again(x)
    torch.testing.assert_close(a["anomaly_map"], b["anomaly_map"])
    from safetensors.torch import load_file

    state = load_file(str(run / "checkpoint.safetensors"))
    t_n, t_ab = model.text_embeddings()
    torch.testing.assert_close(
        state["text.t_n"], t_n.detach(), atol=1e-6, rtol=0
    )  # rebuilt text tower agrees
    assert config["model"]["backbone"] == "madclip-tiny" and config["train"]["epochs"] == 1
    shots = json.loads((run / "shots.json").read_text())
    assert len(shots["shots"]) == 4
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 1 and "loss_det" in log[0] and "seconds" in log[0]


def test_reference_checkpoint_conversion(tmp_path):
    from madclip_train.cli import convert_main

    ref = fake_reference_checkpoint()
    path = tmp_path / "brain.pth"
    torch.save(ref, path)
    state = MadCLIP.convert_reference(load_reference_checkpoint(path))
    torch.testing.assert_close(
        state["adapters.normal.2.det.weight"], ref["normal_det_adapters"]["2.fc2.0.weight"]
    )
    torch.testing.assert_close(
        state["adapters.abnormal.3.seg.weight"], ref["abnormal_det_adapters"]["3.fc3.0.weight"]
    )
    torch.testing.assert_close(
        state["prompts.ctx.abnormal_front"], ref["prompt_maker_abnormal"]["prompt_learner.ctx.abnormal_front"]
    )
    torch.testing.assert_close(
        state["prompts.ctx.normal_end"], ref["prompt_maker_normal"]["prompt_learner.ctx.normal_end"]
    )
    out = tmp_path / "converted"
    assert convert_main([str(path), "--out", str(out), "--objective", "Brain", *TINY]) == 0
    model, _ = load_run(out)
    torch.testing.assert_close(
        model.adapters.normal[1].fc1.weight.detach(), ref["normal_det_adapters"]["1.fc1.0.weight"]
    )


class _Evil:
    def __reduce__(self):
        return (print, ("code executed",))


def test_reference_loader_refuses_pickled_code(tmp_path, capsys):
    from madclip_runtime.errors import MadclipError

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"normal_det_adapters": _Evil()}, f)
    with pytest.raises(MadclipError, match="weights-only"):
        load_reference_checkpoint(path)
    assert "code executed" not in capsys.readouterr().out


def test_real_scans_training_beats_untrained(tiny_cfg, tmp_path):
    from madclip_train.evaluate import metrics_from_predictions, predict_split
    from madclip_train.model import build_model
    from madclip_train.run import TrainRequest, train_run

    root = realscans_or_skip("Brain_AD")
    run = tmp_path / "brain"
    train_run(
        TrainRequest(
            data=str(root),
            out=str(run),
            shots=2,
            epochs=15,
            backbone="madclip-tiny",
            pretrained="none",
            device="cpu",
        )
    )
    test = load_split(root, "test")
    trained = metrics_from_predictions(predict_split(load_run(run)[0], test))
    torch.manual_seed(111)
    untrained_model = build_model(replace(tiny_cfg, objective="Brain"), seed=111)
    untrained = metrics_from_predictions(predict_split(untrained_model, test))
    for key in ("image_auroc", "image_auroc_max_map", "pixel_auroc"):
        assert trained[key] > untrained[key] + 0.05, (key, trained[key], untrained[key])


def test_train_and_eval_cli_end_to_end(demo_root, tmp_path):
    from madclip_train.cli import eval_main, train_main

    run, metrics = tmp_path / "run", tmp_path / "metrics.json"
    assert (
        train_main(
            [
                "--data",
                str(demo_root),
                "--out",
                str(run),
                "--shots",
                "2",
                "--epochs",
                "2",
                "--select-on",
                "valid",
                "--holdout-fraction",
                "0.5",
                *TINY,
            ]
        )
        == 0
    )
    assert json.loads((run / "shots.json").read_text())["held_out"]
    assert eval_main([str(run), "--data", str(demo_root), "--json", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    for key in ("image_auroc", "image_auroc_max_map", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_images"] == 8
    # an existing run is never overwritten without --force
    assert (
        train_main(["--data", str(demo_root), "--out", str(run), "--shots", "2", "--epochs", "1", *TINY]) == 2
    )
    assert (
        train_main(
            ["--data", str(demo_root), "--out", str(run), "--shots", "2", "--epochs", "1", "--force", *TINY]
        )
        == 0
    )
    assert len(json.loads((run / "shots.json").read_text())["held_out"]) == 0
