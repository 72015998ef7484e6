"""Recognising madclip's own output files, so input expansion never scores them as scans.

`madclip-infer DIR --out DIR`, run twice, would otherwise score `scan_overlay.png` and `scan_map.png` as scans
(and write `scan_map_map.png`). Two independent marks, either of which is enough:

* by location: a directory madclip writes results into holds a marker file `.madclip-output`
  (`mark_output_dir`); expansion skips such directories below an input directory, and skips the --out
  directory itself, and inside a marked directory skips every file with an output suffix;
* by name: `<stem>_overlay.png`, `<stem>_map.png` and `<stem>_map.npy` next to the `<stem>.json` that
  `madclip_runtime.overlay.save_prediction` writes last are a result set, wherever they are.

A file named explicitly on the command line is always kept (the user asked for it).
"""
from __future__ import annotations

import os

from .atomic import atomic_write_text

OUTPUT_MARKER = ".madclip-output"
OUTPUT_SUFFIXES = ("_overlay.png", "_map.png", "_map.npy")


def mark_output_dir(directory: str | os.PathLike) -> None:
    """Put the marker into a results directory (idempotent)."""
    path = os.path.join(os.fspath(directory), OUTPUT_MARKER)
    if not os.path.isfile(path):
        atomic_write_text(path, "madclip results directory: madclip-infer does not read scans from here\n")


def is_marked_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, OUTPUT_MARKER))


def output_stem(name: str) -> str | None:
    """'a_overlay.png' -> 'a'; None when the name has no output suffix."""
    low = name.lower()
    for suffix in OUTPUT_SUFFIXES:
        if low.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def is_madclip_output(path: str, marked_dir: bool | None = None) -> bool:
    """True for a file madclip wrote: an output suffix in a marked directory, or next to its `<stem>.json`."""
    stem = output_stem(os.path.basename(path))
    if stem is None:
        return False
    directory = os.path.dirname(path) or "."
    if is_marked_dir(directory) if marked_dir is None else marked_dir:
        return True
    return os.path.isfile(os.path.join(directory, stem + ".json"))
