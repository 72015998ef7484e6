"""MVFA end to end through the CLIs on the real scans (tiny config, random weights): train -> eval (fixed and
transductive) -> export (FP32 + FP16, parity gate) -> infer; and the authors' checkpoint format -> convert ->
export."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import eval_fixed_and_transductive, realscans_or_skip

TINY = ["--backbone", "madclip-tiny", "--pretrained", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def mvfa_run(tmp_path_factory):
    from madclip_train.cli import train_main

    data = realscans_or_skip("Brain_AD")
    out = tmp_path_factory.mktemp("mvfa") / "run"
    assert (
        train_main(
            [
                "--method",
                "mvfa",
                "--data",
                str(data),
                "--shots",
                "2",
                "--epochs",
                "1",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    return data, out


def test_train_records_method_bank_and_normalisers(mvfa_run):
    from safetensors.torch import load_file

    data, run = mvfa_run
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "mvfa"
    assert config["train"]["batch_size"] == 1 and config["train"]["epochs"] == 1
    assert config["model"]["options"] == {}
    fin = config["finalize"]
    assert fin["bank_rows"] == 2 * 11 * 290  # 2 normal shots x 11 views x (1 + 17 x 17) tokens
    state = load_file(str(run / "checkpoint.safetensors"))
    assert state["mvfa.bank"].shape == (4, 2 * 11 * 290, 32)
    assert torch.allclose(state["mvfa.bank"].norm(dim=-1), torch.ones(1), atol=1e-5)
    assert float(state["mvfa.has_masks"]) == 1.0  # Brain_AD has masks: the seg head scores
    # the shots come from valid/, the normalisers from their views only
    shots = json.loads((run / "shots.json").read_text())
    assert all("/valid/" in "/" + s["path"] for s in shots["shots"])


def test_eval_fixed_and_transductive(mvfa_run, tmp_path):
    data, run = mvfa_run
    f, t = eval_fixed_and_transductive(run, data, tmp_path)
    assert f["n_images"] == t["n_images"] == 19
    assert f["normalisation"].startswith("fixed") and t["normalisation"].startswith("transductive")
    for m in (f, t):
        assert 0.0 <= m["image_auroc"] <= 1.0 and 0.0 <= m["pixel_auroc"] <= 1.0


def test_transductive_rejected_for_madclip(trained_tiny_run, tmp_path, capsys):
    from madclip_train.cli import eval_main

    data = realscans_or_skip("Brain_AD")
    assert eval_main([str(trained_tiny_run), "--data", str(data), "--transductive", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--transductive applies to" in err and "MVFA runs only" in err and "'madclip'" in err


def test_unknown_option_is_one_line_error(tmp_path, capsys):
    from madclip_train.cli import train_main

    data = realscans_or_skip("Brain_AD")
    rc = train_main(
        ["--method", "mvfa", "--data", str(data), "--out", str(tmp_path / "r"), "--option", "bogus=1", *TINY]
    )
    assert rc == 2 and "has no such option" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_export_and_infer(mvfa_run, tmp_path, capsys):
    from madclip_export.cli import main as export_main
    from madclip_runtime.cli.infer import main as infer_main
    from madclip_train.data import load_split
    from madclip_train.evaluate import predict_split
    from madclip_train.rundir import load_run

    data, run = mvfa_run
    bundle = tmp_path / "bundle"
    assert export_main([str(run), "--out", str(bundle), "--fp16"]) == 0
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["method"] == "mvfa" and meta["provenance"]["mvfa_head"] == "seg"
    import onnx

    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    names = {i.name for i in graph.graph.initializer}
    assert {"bank_0", "bank_1", "bank_2", "bank_3", "text"} <= names  # the bank is part of the graph
    fp16 = onnx.load(str(bundle / "model_fp16.onnx"), load_external_data=False)
    bank16 = [i for i in fp16.graph.initializer if i.name == "bank_0"][0]
    assert bank16.data_type == onnx.TensorProto.FLOAT16  # the bank is stored FP16 in the FP16 model
    # the bundle reproduces the PyTorch run on a test scan
    split = load_split(str(data), "test")
    img = split.abnormal[0].path
    capsys.readouterr()
    assert infer_main([img, "--bundle", str(bundle), "--json"]) == 0
    model, _ = load_run(run)
    sub = type(split)(split.root, split.name, (), split.abnormal[:1], split.has_masks)
    ref = predict_split(model, sub, device="cpu")
    rec = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rec) == 1 and abs(rec[0]["score"] - float(ref["score"][0])) < 1e-4


def _authors_checkpoint(path, width=64, embed=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = {
        f"{head}_adapters": {
            f"{j}.{fc}.0.weight": torch.randn(shape, generator=g) * 0.1
            for j in range(4)
            for fc, shape in (("fc1", (embed, width)), ("fc2", (width, embed)))
        }
        for head in ("seg", "det")
    }
    torch.save(ref, path)
    return ref


def test_convert_reference_then_export(tmp_path):
    from safetensors.torch import load_file

    from madclip_export.cli import main as export_main
    from madclip_train.cli import convert_main

    data = realscans_or_skip("Brain_AD")
    ref = _authors_checkpoint(tmp_path / "Brain.pth")
    run = tmp_path / "ref-run"
    rc = convert_main(
        [
            str(tmp_path / "Brain.pth"),
            "--method",
            "mvfa",
            "--objective",
            "Brain",
            "--data",
            str(data),
            "--shots",
            "2",
            "--out",
            str(run),
            "--backbone",
            "madclip-tiny",
            "--pretrained",
            "none",
        ]
    )
    assert rc == 0
    state = load_file(str(run / "checkpoint.safetensors"))
    assert torch.equal(state["adapters.seg.1.fc1.weight"], ref["seg_adapters"]["1.fc1.0.weight"])
    assert torch.equal(state["adapters.det.3.fc2.weight"], ref["det_adapters"]["3.fc2.0.weight"])
    assert state["mvfa.bank"].shape[1] == 2 * 11 * 290
    assert export_main([str(run), "--out", str(tmp_path / "bundle")]) == 0
    assert (tmp_path / "bundle" / "model.onnx").is_file()


def test_convert_reference_mvfa_needs_data(tmp_path, capsys):
    from madclip_train.cli import convert_main

    _authors_checkpoint(tmp_path / "Brain.pth")
    rc = convert_main(
        [
            str(tmp_path / "Brain.pth"),
            "--method",
            "mvfa",
            "--objective",
            "Brain",
            "--out",
            str(tmp_path / "r"),
            "--backbone",
            "madclip-tiny",
            "--pretrained",
            "none",
        ]
    )
    assert rc == 2 and "needs --data" in capsys.readouterr().err
