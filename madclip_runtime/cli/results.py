"""Output helpers shared by madclip-infer, madclip-infer --server (`serve.client`) and madclip-batch: input
expansion without madclip's own outputs (`madclip_runtime.outputs`), the --out check, result file stems, the
progress bar and the results table. One module both the local and the remote path import.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Sequence

from ..contract import SCORE, SCORE_MAP_MAX
from ..errors import InputError, MadclipError
from .common import err_console, error_line


def check_out_dir(out: str) -> str:
    """Create --out and prove it is writable (write and remove a probe file) before any inference."""
    out = os.path.abspath(out)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".madclip-probe-{secrets.token_hex(4)}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise MadclipError(f"{out}: output directory is not writable ({exc.strerror or exc})") from None
    return out  # the results marker is written with the first result (outputs.output_path)


def expand_each(
    inputs: Sequence[str], recursive: bool, exclude: Sequence[str] = (), on_error: Any = None
) -> tuple[list[str], int]:
    """Expand every argument on its own so one bad argument is reported and the others still run.

    `exclude`: directories never entered (the --out tree); madclip's own outputs are skipped by the rule above.
    `on_error(message)` reports a bad argument (default: `common.error_line`). Returns (files, n_failed).
    """
    from ..scans.imageio import expand_inputs

    on_error = on_error or error_line
    files: list[str] = []
    seen: set[str] = set()
    failed = 0
    for raw in inputs:
        try:
            found = expand_inputs([raw], recursive=recursive, exclude=exclude)
        except InputError as exc:
            on_error(str(exc))  # type: ignore[operator]
            failed += 1
            continue
        for f in found:
            key = os.path.normpath(f)
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files, failed


def file_stem(path: str) -> str:
    """'dir/a.png' -> 'a'; 'v.nii.gz' -> 'v'."""
    name = os.path.basename(path)
    if name.lower().endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    stem = os.path.splitext(name)[0]
    return stem or name


def output_stem(source: str, used: set[str]) -> str:
    """'dir/a.png' -> 'a'; volume slice 'dir/v.nii.gz#slice=7' -> 'v_s007'; repeated names get '_2', '_3'."""
    path, _, slice_part = source.partition("#slice=")
    stem = file_stem(path)
    if slice_part:
        stem = f"{stem}_s{int(slice_part):03d}"
    base, k = stem, 2
    while stem in used:
        stem, k = f"{base}_{k}", k + 1
    used.add(stem)
    return stem


def progress_bar(enabled: bool) -> Any:
    """The progress bar of madclip-infer / --server / madclip-batch (on stderr, transient; off when disabled)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not enabled,
    )


def short_path(path: str) -> str:
    """A path relative to the working directory when that is shorter (table display only)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return rel if len(rel) < len(path) else path


def result_table(rows: list[dict[str, Any]]) -> Any:
    """The results table madclip-infer prints (local and --server): file, score, map max, label, latency."""
    from rich.table import Table
    from rich.text import Text

    from .. import INTENDED_USE
    from ..safe_text import escape_control

    table = Table(caption=INTENDED_USE)
    table.add_column("file", overflow="fold")
    for name, justify in ((SCORE, "right"), ("map max", "right"), ("label", "left"), ("latency ms", "right")):
        table.add_column(name, justify=justify)
    for r in rows:
        label = r["label"] or "-"
        style = "bold red" if label == "anomaly" else ("green" if label == "normal" else "")
        table.add_row(
            Text(escape_control(short_path(r["file"]))),
            f"{r[SCORE]:.4f}" if r[SCORE] is not None else "nan",
            f"{r[SCORE_MAP_MAX]:.4f}" if r[SCORE_MAP_MAX] is not None else "nan",
            f"[{style}]{label}[/]" if style else label,
            f"{r['latency_ms']:.1f}",
        )
    return table
