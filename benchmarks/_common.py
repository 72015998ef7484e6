"""Shared plumbing of the benchmark scripts: the machine description, measured subprocesses, JSON and tables.

Every measured step runs as its own process (the console scripts users run), so its wall time and peak RSS
are its own: peak RSS comes from os.wait4 on that child, not from a running maximum of this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from madclip_runtime.machine import machine_description

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("MADCLIP_BENCH_WORK", HERE / "work"))  # runs, bundles, demo data (not committed)
RESULTS = Path(os.environ.get("MADCLIP_BENCH_RESULTS", HERE / "results"))  # the JSON files RESULTS.md quotes
BIN = Path(sys.executable).parent
console = Console(width=200)


@dataclass
class Measured:
    cmd: list[str]
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def tool(name: str) -> str:
    """Path of a console script of the running venv (falls back to PATH)."""
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def run(cmd: list[str], check: bool = True) -> Measured:
    """Run `cmd`, returning its wall time and its own peak RSS (os.wait4 on the child)."""
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    out_path, err_path = WORK / ".stdout", WORK / ".stderr"
    WORK.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = out_path.read_text(), err_path.read_text()
    if check and proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"benchmark step failed (exit {proc.returncode}): {' '.join(cmd)}")
    return Measured(cmd, seconds, usage.ru_maxrss / 1024, stdout, stderr)


def demo_data(n_valid: int = 16, n_test: int = 20) -> Path:
    """The project's procedural demo dataset (generated once into the work folder)."""
    root = WORK / "data" / "Brain_AD"
    if not (root / "test").is_dir():
        run(
            [
                tool("madclip-demo-data"),
                "--out",
                str(WORK / "data"),
                "--n-valid",
                str(n_valid),
                "--n-test",
                str(n_test),
                "--force",
            ]
        )
    return root


def write_json(name: str, payload: dict) -> Path:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_description(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **payload,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    console.print(f"wrote {path}")
    return path


def print_machine() -> None:
    m = machine_description()
    console.print(
        f"machine: {m['cpu_model']}, {m['cpu_count']} cores, {m['ram_gb']} GB RAM, {m['platform']}, "
        f"python {m['python']}, onnxruntime {m.get('onnxruntime')}"
    )


def table(title: str, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:,.2f}"
    return str(v)
