"""CLI trust: validated numeric options in every CLI, the safety net, escaped names, madclip's outputs never re-read,
open_clip's INFO chatter quieted. Regression tests for issue 10's observed cases."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from madclip_runtime.cli.common import bounded_int, error_line, finite_float, run_cli, setup_logging
from madclip_runtime.safe_text import escape_control
from madclip_runtime.scans.imageio import expand_inputs

from .conftest import cli_error_lines, copy_tree


def _entry(name: str):
    import importlib

    module, func = {
        "train": ("madclip_train.cli", "train_main"),
        "eval": ("madclip_train.cli", "eval_main"),
        "convert": ("madclip_train.cli", "convert_main"),
        "demo": ("madclip_train.demo", "main"),
        "export": ("madclip_export.cli", "main"),
        "infer": ("madclip_runtime.cli.infer", "main"),
        "bench": ("madclip_runtime.cli.bench", "main"),
        "prepare": ("madclip_runtime.cli.prepare", "main"),
    }[name]
    return getattr(importlib.import_module(module), func)


# every numeric option of every CLI, with values that must be refused (observed: --lr nan / inf, --throughput-iters
# -1, --opset 5 were accepted)
BAD_OPTIONS = [
    ("train", ["--data", "d", "--out", "o"], "--lr", ["nan", "inf", "-inf", "-1e-3", "0", "abc"]),
    ("train", ["--data", "d", "--out", "o"], "--epochs", ["-1", "0", "1.5", "nan"]),
    ("train", ["--data", "d", "--out", "o"], "--shots", ["0", "-3"]),
    ("train", ["--data", "d", "--out", "o"], "--batch-size", ["0"]),
    ("train", ["--data", "d", "--out", "o"], "--image-size", ["-5", "0", "100000"]),
    ("train", ["--data", "d", "--out", "o"], "--holdout-fraction", ["nan", "1.5", "0", "1"]),
    ("train", ["--data", "d", "--out", "o"], "--seed", ["-1"]),
    ("train", ["--data", "d", "--out", "o"], "--init-seed", ["-1"]),
    ("eval", ["run", "--data", "d"], "--batch-size", ["0", "-1"]),
    ("convert", ["c.pth", "--out", "o", "--objective", "Brain"], "--image-size", ["-5", "nan"]),
    ("demo", [], "--n-valid", ["-1", "0"]),
    ("demo", [], "--n-test", ["-1"]),
    ("demo", [], "--size", ["-5", "1"]),
    ("demo", [], "--seed", ["-1"]),
    ("export", ["run", "--out", "b"], "--opset", ["5", "17", "22", "nan"]),
    ("export", ["run", "--out", "b"], "--max-batch", ["0", "-1"]),
    ("infer", ["x.png", "--bundle", "b"], "--threshold", ["nan", "inf", "-inf", "abc", "-1"]),
    ("infer", ["x.png", "--bundle", "b"], "--slice", ["-1", "x"]),
    ("infer", ["x.nii", "--bundle", "b"], "--max-voxels", ["0", "-1", "nan"]),
    ("infer", ["x.nii", "--bundle", "b"], "--map-threshold", ["nan", "-1", "inf"]),
    ("infer", ["x.nii", "--bundle", "b"], "--volume-index", ["-1"]),
    ("prepare", ["--images", "i", "--labels", "l", "--out", "o"], "--valid-fraction", ["nan", "1.5", "0"]),
    ("prepare", ["--images", "i", "--labels", "l", "--out", "o"], "--min-content", ["-0.1", "1", "inf"]),
    ("prepare", ["--images", "i", "--labels", "l", "--out", "o"], "--max-per-volume", ["0"]),
    ("prepare", ["--images", "i", "--labels", "l", "--out", "o"], "--seed", ["-1"]),
    ("bench", ["--bundle", "b"], "--throughput-iters", ["-1", "0"]),
    ("bench", ["--bundle", "b"], "--iters", ["0", "-5"]),
    ("bench", ["--bundle", "b"], "--warmup", ["-1"]),
    ("bench", ["--bundle", "b"], "--batch", ["0"]),
]


@pytest.mark.parametrize(
    "cli, base, option, values", BAD_OPTIONS, ids=[f"{c}{o}" for c, _, o, _ in BAD_OPTIONS]
)
def test_numeric_options_refused_in_one_line(capsys, cli, base, option, values):
    main = _entry(cli)
    for value in values:
        with pytest.raises(SystemExit) as ei:
            main([*base, f"{option}={value}"])
        assert ei.value.code == 2, (option, value)
        out, err = capsys.readouterr()
        lines = cli_error_lines(err)
        assert len(lines) == 1 and option in lines[0] and "Traceback" not in err, (option, value, err)


def test_type_helpers():
    f = finite_float(0.0, 1.0, min_open=True)
    assert f("0.5") == 0.5 and f("1") == 1.0
    for bad in ("nan", "NaN", "inf", "-Infinity", "0", "1.01", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            f(bad)
    i = bounded_int(1, 10)
    assert i("10") == 10 and i(" 3 ") == 3
    for bad in ("0", "11", "1.0", "nan", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            i(bad)


# ------------------------------------------------------------------------------------------ safety net


def test_safety_net_one_line_and_traceback_with_verbose(capsys):
    def body():
        raise RuntimeError("something nobody anticipated\nsecond line")

    setup_logging(False)
    assert run_cli(body) == 1
    err = capsys.readouterr().err
    lines = cli_error_lines(err)
    assert len(lines) == 1 and "unexpected RuntimeError: something nobody anticipated" in lines[0]
    assert "run with -v for details" in lines[0] and "Traceback" not in err
    setup_logging(True)
    try:
        assert run_cli(body) == 1
    finally:
        setup_logging(False)
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError" in err


def test_run_config_without_model_key_is_one_line(trained_tiny_run, tmp_path, capsys):
    from madclip_export.cli import main

    run = copy_tree(trained_tiny_run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))
    assert main([str(run), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in cli_error_lines(err) if line.startswith("error:")]
    assert len(lines) == 1 and "key 'model' is missing" in lines[0] and "Traceback" not in err
    config["model"] = {
        "backbone": "madclip-tiny",
        "pretrained": "none",
        "objective": "Brain",
        "image_size": "big",
    }
    (run / "config.json").write_text(json.dumps(config))
    assert main([str(run), "--out", str(tmp_path / "b")]) == 2
    assert "'model.image_size' must be int" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ escaped names


def test_escape_control():
    assert (
        escape_control("evil\nerror: none - self-test PASSED.png")
        == "evil\\nerror: none - self-test PASSED.png"
    )
    assert escape_control("a\x1b[2Jb\x07") == "a\\x1b[2Jb\\x07"
    assert escape_control("rtl\u202eabc") == "rtl\\u202eabc"
    assert escape_control("plain é 中 name.png") == "plain é 中 name.png"


def test_error_line_and_log_escape_names(capsys):
    setup_logging(False)
    error_line("evil\nerror: none - self-test PASSED.png: truncated")
    logging.getLogger("madclip_runtime.test").warning("%s: odd", "a\x1b[2Jb")  # madclip's own line
    err = capsys.readouterr().err
    assert "\x1b[2J" not in err and "\\x1b[2Jb" in err
    assert cli_error_lines(err)[0].startswith("error: evil\\nerror: none")
    assert len([line for line in cli_error_lines(err) if "PASSED" in line]) == 1


def _png(path: Path, value: int = 90) -> Path:
    Image.fromarray(np.full((32, 32), value, np.uint8)).save(path)
    return path


@pytest.fixture()
def bundle(exported_tiny_bundle, tmp_path) -> Path:
    return copy_tree(exported_tiny_bundle, tmp_path / "bundle")


def test_hostile_file_names_reach_the_terminal_escaped(bundle, tmp_path, capsys):
    from madclip_runtime.cli.infer import main

    d = tmp_path / "in"
    d.mkdir()
    (d / "evil\nerror: none - self-test PASSED.png").write_bytes(b"not a png")  # fails: an error line
    _png(d / "clear\x1b[2Jscreen.png")  # scores: a table row
    rc = main([str(d), "--bundle", str(bundle)])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "\x1b[2J" not in out + err and "\\x1b[2Jscreen" in out
    bad = [line for line in cli_error_lines(err) if line.startswith("error:")]
    assert len(bad) == 1 and "evil\\nerror: none - self-test PASSED.png" in bad[0]
    assert not any(line.startswith("error: none") for line in err.splitlines())


# ------------------------------------------------------------------------------------------ own outputs


def test_expansion_skips_result_files_by_name_and_location(tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    _png(d / "a.png")
    _png(d / "a_overlay.png")
    _png(d / "a_map.png")
    (d / "a.json").write_text("{}")
    _png(d / "b_map.png")  # no b.json beside it: a user's scan that happens to end in _map
    results = d / "results"
    results.mkdir()
    (results / ".madclip-output").write_text("x")
    _png(results / "c.png")
    other = d / "elsewhere"
    other.mkdir()
    _png(other / "d.png")
    names = lambda files: sorted(os.path.relpath(f, d) for f in files)  # noqa: E731
    assert names(expand_inputs([str(d)])) == ["a.png", "b_map.png"]
    assert names(expand_inputs([str(d)], recursive=True)) == ["a.png", "b_map.png", "elsewhere/d.png"]
    assert names(expand_inputs([str(d)], recursive=True, exclude=[str(other)])) == ["a.png", "b_map.png"]
    assert names(expand_inputs([str(d / "*.png")])) == ["a.png", "b_map.png"]
    assert names(expand_inputs([str(d / "a_overlay.png")])) == ["a_overlay.png"]  # named explicitly: kept


def test_infer_twice_into_its_input_folder_scores_only_the_scans(bundle, tmp_path, capsys):
    from madclip_runtime.cli.infer import main

    d = tmp_path / "scans"
    d.mkdir()
    _png(d / "scan.png", 60)
    _png(d / "other.png", 160)
    for _ in range(2):
        assert main([str(d), "--bundle", str(bundle), "--out", str(d), "--json"]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sorted(os.path.basename(r["file"]) for r in records) == ["other.png", "scan.png"]
    assert not list(d.glob("*_map_map*")) and not list(d.glob("*_overlay_*"))
    # and an --out folder below the input folder is never entered, run after run
    out = d / "res"
    for _ in range(2):
        assert main([str(d), "-r", "--bundle", str(bundle), "--out", str(out), "--json"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 2


# ------------------------------------------------------------------------------------------ open_clip logging


def test_open_clip_output_only_with_verbose(capsys):
    """open_clip's INFO and warnings (on the root logger, from its own files) are other libraries' output:
    hidden in a normal run, shown with -v (madclip_runtime.logs)."""
    import open_clip

    setup_logging(False)
    root = logging.getLogger()
    path = os.path.join(os.path.dirname(open_clip.__file__), "factory.py")
    for level, msg in (
        (logging.INFO, "Loaded ViT model config."),
        (logging.WARNING, "pretrained weights missing"),
    ):
        root.handle(root.makeRecord("root", level, path, 1, msg, None, None))
    err = capsys.readouterr().err
    assert "Loaded ViT model config." not in err and "pretrained weights missing" not in err
    setup_logging(True)
    try:
        for level, msg in (
            (logging.INFO, "Loaded ViT model config."),
            (logging.WARNING, "pretrained weights missing"),
        ):
            root.handle(root.makeRecord("root", level, path, 1, msg, None, None))
        err = capsys.readouterr().err
        assert "Loaded ViT model config." in err and "pretrained weights missing" in err
    finally:
        setup_logging(False)


def test_threshold_override_outside_score_range_refused(bundle, tmp_path, capsys):
    import madclip_runtime as mr
    from madclip_runtime.cli.infer import main
    from madclip_runtime.errors import InputError

    with pytest.raises(InputError, match=r"outside the score range \[0, 4\]"):
        mr.load(bundle, threshold=7.0)
    rc = main([str(_png(tmp_path / "s.png")), "--bundle", str(bundle), "--threshold", "7"])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the score range" in err and "Traceback" not in err
