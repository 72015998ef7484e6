"""The one output rule (issue 20): every file madclip writes is recognised, and never read back as an input.

The output kinds are derived from the writers themselves: an AST pass finds every function of the runtime that
writes a file (through `madclip_runtime.atomic`), each must be a registered writer of `outputs.OUTPUT_KINDS`
(or declared below as writing something that is not a result), and every registered writer is run here with
its file checked against `outputs.is_madclip_output`. A new output kind cannot be forgotten: its writer fails
the AST check until registered, and its files fail the recognition check until the rule covers them.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

from madclip_runtime import outputs
from madclip_runtime.cli.infer import main as infer_main
from madclip_runtime.scans.imageio import expand_inputs

from .conftest import build_tiny_bundle, lesion_volume, write_dicom_series

ROOT = Path(__file__).resolve().parents[1] / "madclip_runtime"
WRITE_PRIMITIVES = {
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_save_npy",
    "atomic_save_png",
    "atomic_writer",
}
# Functions that write files which are not results of scoring (and can never be taken for a scan input).
NOT_RESULTS = {
    "madclip_runtime.bundles.bundle:write_metadata": "a bundle's metadata.json (madclip-export)",
    "madclip_runtime.bundles.signing:generate_keypair": "key files (madclip-keygen)",
    "madclip_runtime.engines.trt_engine:build_engine": "TensorRT engine cache",
    "madclip_runtime.scans.prepare:prepare": "prepared training data: meant to be read as input",
    "madclip_runtime.cli.bench:_main": "madclip-bench --json report at a path the user names (JSON)",
    "madclip_runtime.dicomnet.spool:Spool.store_instance": "the DICOM node's received instances: inputs",
    "madclip_runtime.dicomnet.spool:Spool.move_failed": "the DICOM node's unscored inputs and reason.txt",
    "madclip_runtime.dicomnet.spool:Spool.mark_sent": "the DICOM node's journal of sent items (JSON, not a scan)",
}


def runtime_writers() -> set[str]:
    """'module:function' (or 'module:Class.method') of every runtime function that calls a write primitive."""
    found: set[str] = set()
    for path in ROOT.rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        if mod == "madclip_runtime.atomic":
            continue

        def visit(node: ast.AST, prefix: str, mod: str = mod) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    calls = {
                        getattr(n.func, "id", getattr(n.func, "attr", None))
                        for n in ast.walk(child)
                        if isinstance(n, ast.Call)
                    }
                    if calls & WRITE_PRIMITIVES:
                        found.add(f"{mod}:{name}")
                    visit(child, f"{name}.<locals>.", mod)
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.", mod)

        visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return found


def registered_writers() -> set[str]:
    return {w for kind in outputs.OUTPUT_KINDS.values() for w in kind.writers}


def test_every_writer_is_registered():
    found = runtime_writers()
    assert found, "the AST pass found no writer at all"
    unregistered = found - registered_writers() - set(NOT_RESULTS)
    assert not unregistered, (
        f"writers without a registered output kind (outputs.register_output): {unregistered}"
    )
    stale = (registered_writers() | set(NOT_RESULTS)) - found
    assert not stale, f"registered writers that write nothing any more: {stale}"


def test_register_output_api():
    before = dict(outputs.OUTPUT_KINDS)
    try:
        suffix = outputs.register_output("test_kind", "_test.nii.gz", "tests.test_outputs:writer")
        assert outputs.register_output("test_kind", "_test.nii.gz", "tests.test_outputs:writer") == suffix
        with pytest.raises(ValueError):
            outputs.register_output("test_kind", "_other.png", "tests.test_outputs:writer")
        with pytest.raises(ValueError):
            outputs.register_output("no_writer", "_x.png")
        assert outputs.result_stem("case_test.nii.gz") == "case"
    finally:
        outputs.OUTPUT_KINDS.clear()
        outputs.OUTPUT_KINDS.update(before)
    with pytest.raises(ValueError):
        outputs.output_path("/tmp", "x", "_never_registered.png")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("standin") / "b", size=64)


def _png(path: Path, value: int) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[0:48, 0:40]
    Image.fromarray(((xx * 3 + yy + value) % 256).astype(np.uint8)).save(path)
    return path


def _nifti(path: Path) -> Path:
    nib = pytest.importorskip("nibabel")
    vol, _ = lesion_volume()
    img = nib.Nifti1Image(vol, np.diag([0.9, 0.8, 2.5, 1.0]))
    img.header["cal_min"], img.header["cal_max"] = 0, 1600
    nib.save(img, str(path))
    return path


def _kinds_of(directory: Path) -> dict[str, str]:
    """file name -> the registered kind whose suffix it ends with (longest), for every file below `directory`."""
    kinds = {}
    for p in directory.rglob("*"):
        if p.is_file():
            low = p.name.lower()
            match = [k for k in outputs.OUTPUT_KINDS.values() if low.endswith(k.suffix)]
            kinds[str(p.relative_to(directory))] = (
                max(match, key=lambda k: len(k.suffix)).name if match else ""
            )
    return kinds


def test_every_writer_runs_and_its_files_are_recognised(standin, tmp_path, capsys):
    """Run every registered writer for real; every file each wrote is recognised by the one rule."""
    pytest.importorskip("highdicom")
    from madclip_runtime.bundles.bundle import load_bundle
    from madclip_runtime.predictor import load
    from madclip_runtime.serve import batch

    scans = tmp_path / "scans"
    scans.mkdir()
    _png(scans / "a.png", 10)
    _nifti(scans / "case.nii.gz")
    vol, _ = lesion_volume(shape=(24, 20, 5), lesion_slice=1)
    write_dicom_series(tmp_path / "ct", np.transpose(vol, (2, 1, 0)).copy())  # [N, R, C]
    out = tmp_path / "out"
    common = ["--bundle", str(standin), "--out", str(out), "--json"]
    assert infer_main([str(scans / "a.png"), *common]) == 0  # overlay writer, png16
    assert infer_main([str(scans / "a.png"), *common, "--map-format", "npy"]) == 0  # overlay writer, npy
    assert infer_main([str(scans / "case.nii.gz"), *common]) == 0  # volume writer
    assert infer_main([str(tmp_path / "ct"), *common, "--dicom-seg", "--map-threshold", "2.1"]) == 0  # + SEG
    capsys.readouterr()

    # madclip-batch's writers (the Ray-free parts: the same functions the job calls)
    bout = tmp_path / "batch"
    scorer = batch.Scorer.__new__(batch.Scorer)  # without the actor's verified load: only save_map is used
    scorer.predictor = load(standin, backend="ort-cpu")
    for fmt in ("npy", "png16"):
        scorer.maps_dir, scorer.map_format = str(bout / batch.MAPS_DIR), fmt
        scorer.save_map("a-0123456789", 0, np.zeros((8, 8), np.float32))
    item = batch.file_item(str(scans / "a.png"))
    doc = batch.write_file_result(
        str(bout), item, [{"file": item.path, "slice": None, "status": "ok", "error": ""}]
    )
    batch.write_summary(str(bout), [doc], ("csv", "parquet"))
    assert load_bundle(standin, verify="none")  # the bundle stays untouched by all this

    # the DICOM node's spool: results in the outbox
    from madclip_runtime.dicomnet.spool import Spool

    spool = Spool(str(tmp_path / "spool"))
    item = spool.commit_result("k" * 24, {"seg.dcm": b"seg", "sr.dcm": b"sr"}, {"file": "x"})
    spool.set_item_state(item, {"attempts": 1, "next_try": 0.0})

    results = {"out": out, "batch": bout, "outbox": tmp_path / "spool" / "outbox"}
    kinds = {f"{tag}/{k}": v for tag, base in results.items() for k, v in _kinds_of(base).items()}
    unknown = [name for name, kind in kinds.items() if not kind]
    assert not unknown, f"files written with no registered output kind: {unknown}"
    assert set(kinds.values()) == set(outputs.OUTPUT_KINDS), (
        "a registered kind was not produced by its writer"
    )
    for base in results.values():
        for p in base.rglob("*"):
            if p.is_file():
                assert outputs.is_madclip_output(str(p)), f"{p} is madclip's output but not recognised"


def test_infer_twice_into_a_volume_folder_scores_only_the_scans(standin, tmp_path, capsys):
    """`madclip-infer D --out D` twice: the second run scores case.nii.gz and a.png, not its own outputs."""
    d = tmp_path / "D"
    d.mkdir()
    _nifti(d / "case.nii.gz")
    _png(d / "a.png", 40)
    for run in range(2):
        rc = infer_main([str(d), "--bundle", str(standin), "--out", str(d), "--json"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        files = sorted(os.path.basename(json.loads(line)["file"]) for line in cap.out.splitlines())
        assert files == ["a.png", "case.nii.gz"], f"run {run + 1} scored {files}"
    names = sorted(p.name for p in d.iterdir())
    assert "case_map.nii.gz" in names and "case_montage.png" in names
    assert not [n for n in names if "_map_map" in n or "_map_s0" in n or "_montage_" in n]


def test_batch_output_tree_is_never_an_input(tmp_path):
    """madclip-batch D -r --out D/res --maps png16: its maps, results and summaries are not expanded."""
    d = tmp_path / "D"
    d.mkdir()
    _png(d / "scan.png", 5)
    res = d / "res"
    for sub in ("", "results", "maps"):
        outputs.mark_output_dir(outputs.output_path(res / sub, "x", outputs.RECORD_JSON).rsplit(os.sep, 1)[0])
    _png(res / "maps" / "scan-0123456789_s000_map.png", 7)
    assert [Path(p).name for p in expand_inputs([str(d)], recursive=True)] == ["scan.png"]
    assert [Path(p).name for p in expand_inputs([str(d / "**" / "*.png")], recursive=True)] == ["scan.png"]


def test_dicom_node_spool_results_are_never_inputs(tmp_path):
    from madclip_runtime.dicomnet.spool import Spool

    spool = Spool(str(tmp_path / "spool"))
    spool.commit_result("k" * 24, {"seg.dcm": b"seg"}, {"file": "x"})
    _png(tmp_path / "spool" / "scan.png", 3)  # a scan a user put there
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "spool")], recursive=True)] == ["scan.png"]


def test_rule_needs_a_marker_or_a_sibling_record(tmp_path):
    """A user's own file that merely ends like an output is kept outside madclip's result directories."""
    (tmp_path / "brain_map.nii.gz").write_bytes(b"x")
    assert not outputs.is_madclip_output(str(tmp_path / "brain_map.nii.gz"))
    (tmp_path / "brain.json").write_text("{}")
    assert outputs.is_madclip_output(str(tmp_path / "brain_map.nii.gz"))
    assert not outputs.is_madclip_output(str(tmp_path / "brain.nii.gz"))
    assert outputs.slice_number("v.nii.gz#slice=7") == 7 and outputs.slice_number("a.png") is None
