"""madclip's own output files: ONE registry of every kind it writes and the ONE rule that recognises them
(the output helpers the CLIs share, built on this, are in `madclip_runtime.cli.results`).

The rule (`is_madclip_output`), applied by input expansion (`madclip_runtime.scans.imageio.expand_inputs`,
used by madclip-infer, madclip-infer --server and madclip-batch), so a second run over its own output
directory never scores what the first one wrote:

* a directory madclip writes into carries the marker file `.madclip-output` (`mark_output_dir`, called by
  every writer through `output_path`); expansion never descends into a marked directory below an input, nor
  into the --out directory; and
* a file whose name ends with a registered output suffix (`OUTPUT_KINDS`) is an output when it lies in a
  marked directory (or below one), or beside the `<stem>.json` that madclip writes last for each result set.

A file named explicitly on the command line is always kept (the user asked for it).

Adding an output kind (for a new writer) is one call, in this module or in the writer's module at import:

    WRITER = "madclip_runtime.scans.volume_output:write_result_set"
    PROB = register_output("volume_prob", "_prob.nii.gz", WRITER)
    path = output_path(out_dir, stem, PROB)          # marks out_dir, returns out_dir/<stem>_prob.nii.gz

`tests/test_outputs.py` finds every function of the runtime that writes a file (AST) and requires it to be
a registered writer (or a declared non-output writer); it runs each writer and checks that every file it wrote
is recognised, so a new output kind cannot be forgotten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .atomic import atomic_write_text
from .contract import DICOM_SEG_SUFFIX, VOLUME_MAP_SUFFIX, VOLUME_MONTAGE_SUFFIX

OUTPUT_MARKER = ".madclip-output"


@dataclass(frozen=True)
class OutputKind:
    """One kind of file madclip writes: `suffix` ends its name (lower case); `writers`: "module:function"."""

    name: str
    suffix: str
    writers: tuple[str, ...]


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_output(name: str, suffix: str, *writers: str) -> str:
    """Register an output kind (idempotent for the same values); returns `suffix` for the writers to use.

    `suffix` is the end of the file name, e.g. "_map.nii.gz" (or a whole name such as "summary.csv");
    `writers` name the functions that write it ("package.module:function" or "module:Class.method"); the
    tests require every function of the runtime that writes files to be one of them (or declared as not
    writing outputs) and check that each writer's files are recognised.
    """
    if not writers:
        raise ValueError(f"output kind {name!r}: name the function(s) that write it")
    kind = OutputKind(name, suffix.lower(), tuple(writers))
    old = OUTPUT_KINDS.get(name)
    if old is not None and old != kind:
        raise ValueError(f"output kind {name!r} is already registered as {old}")
    OUTPUT_KINDS[name] = kind
    return suffix


# ---- the kinds madclip writes today (one place; a new writer adds its own line) -------------------------
_OVERLAY = "madclip_runtime.overlay:save_prediction"
_VOLUME = "madclip_runtime.scans.volume_output:write_result_set"  # via save_volume_outputs
_BATCH_MAP = "madclip_runtime.serve.batch:Scorer.save_map"
_BATCH_RESULT = "madclip_runtime.serve.batch:write_file_result"
_BATCH_SUMMARY = "madclip_runtime.serve.batch:write_summary"
_MARKER = "madclip_runtime.outputs:mark_output_dir"
_SPOOL = "madclip_runtime.dicomnet.spool:Spool."  # the DICOM node's outbox items (results waiting to be sent)

MARKER = register_output("marker", OUTPUT_MARKER, _MARKER)
RECORD_JSON = register_output(
    "record_json",
    ".json",
    _OVERLAY,
    _VOLUME,
    _BATCH_RESULT,
    _SPOOL + "commit_result",
    _SPOOL + "set_item_state",
)
OVERLAY_PNG = register_output("overlay_png", "_overlay.png", _OVERLAY)
MAP_PNG16 = register_output("map_png16", "_map.png", _OVERLAY, _BATCH_MAP)
MAP_NPY = register_output("map_npy", "_map.npy", _OVERLAY, _BATCH_MAP)
VOLUME_MAP = register_output("volume_map", VOLUME_MAP_SUFFIX, _VOLUME)
MONTAGE_PNG = register_output("montage_png", VOLUME_MONTAGE_SUFFIX, _VOLUME)
DICOM_SEG = register_output(
    "dicom_seg", DICOM_SEG_SUFFIX, _VOLUME, "madclip_runtime.cli.infer:_write_image_seg"
)
SUMMARY_CSV = register_output("summary_csv", "summary.csv", _BATCH_SUMMARY)
SUMMARY_PARQUET = register_output("summary_parquet", "summary.parquet", _BATCH_SUMMARY)
NODE_SEG = register_output("node_seg", "seg.dcm", _SPOOL + "commit_result")  # outbox/<item>/seg.dcm
NODE_SR = register_output("node_sr", "sr.dcm", _SPOOL + "commit_result")  # outbox/<item>/sr.dcm


def mark_output_dir(directory: str | os.PathLike) -> None:
    """Put the marker into a results directory (idempotent)."""
    path = os.path.join(os.fspath(directory), OUTPUT_MARKER)
    if not os.path.isfile(path):
        atomic_write_text(path, "madclip results directory: madclip does not read scans from here\n")


def output_path(out_dir: str | os.PathLike, stem: str, suffix: str) -> str:
    """`out_dir/<stem><suffix>` for a registered suffix, with `out_dir` created and marked."""
    if suffix.lower() not in {k.suffix for k in OUTPUT_KINDS.values()}:
        raise ValueError(f"{suffix!r} is not a registered output suffix (outputs.register_output)")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    mark_output_dir(out_dir)
    return os.path.join(out_dir, f"{stem}{suffix}")


def is_marked_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, OUTPUT_MARKER))


def result_stem(name: str) -> str | None:
    """'a_overlay.png' -> 'a', 'v_map.nii.gz' -> 'v', 'summary.csv' -> ''; None without an output suffix."""
    low = name.lower()
    best = None
    for kind in OUTPUT_KINDS.values():  # the longest matching suffix wins ("_map.nii.gz" over ".json" etc.)
        if low.endswith(kind.suffix) and (best is None or len(kind.suffix) > len(best)):
            best = kind.suffix
    return None if best is None else name[: len(name) - len(best)]


def in_marked_tree(directory: str) -> bool:
    """`directory` or one of its parents carries the marker (expansion never enters such a tree)."""
    here = os.path.abspath(directory)
    while True:
        if is_marked_dir(here):
            return True
        parent = os.path.dirname(here)
        if parent == here:
            return False
        here = parent


def is_madclip_output(path: str, marked_dir: bool | None = None) -> bool:
    """THE rule: a registered output suffix, in (or below) a marked directory, or beside its `<stem>.json`.

    `marked_dir`: the caller already knows whether the file's directory is in a marked tree."""
    name = os.path.basename(path)
    stem = result_stem(name)
    if stem is None:
        return False
    directory = os.path.dirname(path) or "."
    if in_marked_tree(directory) if marked_dir is None else marked_dir:
        return True
    return (
        bool(stem)
        and name.lower() != f"{stem}.json".lower()
        and os.path.isfile(os.path.join(directory, stem + ".json"))
    )


def slice_number(source: str) -> int | None:
    """The slice number of a scan source ('v.nii.gz#slice=7' -> 7), None for a 2-D image."""
    _, sep, part = source.rpartition("#slice=")
    return int(part) if sep and part.isdigit() else None
