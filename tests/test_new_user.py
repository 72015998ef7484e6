"""Issue 20 item 10: a new user's first runs. `madclip-train --method mediclip` on a folder with fewer normal
scans than --shots uses all of them with a one-line note, exactly as `madclip-synth` does on the same folder;
the quickstart's fallback keeps every step (its time is measured by the quickstart itself)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["--backbone", "madclip-tiny", "--pretrained", "none", "--device", "cpu"]


def _normals(path: Path, n: int = 4, size: int = 64) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path / f"scan_{i}.png")
    return path


def test_mediclip_uses_all_of_fewer_normals_like_synth(tmp_path, capsys):
    from madclip_train.cli import train_main
    from madclip_train.synthesis.cli import main as synth_main

    folder = _normals(tmp_path / "normals")
    run = tmp_path / "run"
    # no --shots: the default 16 is more than the 4 scans there are
    assert (
        train_main(
            [
                "--method",
                "mediclip",
                "--data",
                str(folder),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--image-size",
                "64",
                *TINY,
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "fewer than --shots 16" in line]
    assert len(notes) == 1 and "using all 4" in notes[0], err
    shots = json.loads((run / "shots.json").read_text())
    assert shots["n_normal"] == 4 and shots["n_abnormal"] == 0
    assert json.loads((run / "config.json").read_text())["train"]["shots"] == 4  # what was used, not asked
    trained = sorted(Path(s["path"]).name for s in shots["shots"])
    assert trained == [f"scan_{i}.png" for i in range(4)]

    assert (
        synth_main(
            [
                "--data",
                str(folder),
                "--out",
                str(tmp_path / "synth"),
                "-n",
                "4",
                "--image-size",
                "32",
                "--tile",
                "32",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "fewer than --shots 16" in line]) == 1, err
    doc = json.loads((tmp_path / "synth" / "samples.json").read_text())
    records = doc["samples"] if isinstance(doc, dict) else doc
    assert sorted({Path(r["source"]).name for r in records}) == trained  # the same four scans


def test_explicit_shots_within_the_folder_are_kept(tmp_path):
    from madclip_train.synthesis.io import normal_samples

    folder = _normals(tmp_path / "normals", n=5)
    assert len(normal_samples(folder, 3, 111)) == 3
    assert len(normal_samples(folder, 9, 111)) == 5
