"""Issue 20 item 9: a normal run prints madclip's own lines and progress only; other libraries' log lines and
warnings appear with -v (madclip_runtime.logs, configured by every CLI's setup_logging)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from madclip_runtime import logs
from madclip_runtime.cli.common import setup_logging

# Lines other libraries print during an export when nobody quiets them (onnxscript's optimiser, onnxruntime's
# quantiser, open_clip on random weights).
FOREIGN = re.compile(
    r"Replaced initializer|constant folding|unused (nodes|functions)|is not 0\.|"
    r"pre-processing before quantization|No pretrained weights loaded|"
    r"UserWarning|DeprecationWarning"
)
ONNXSCRIPT = re.compile(r"Replaced initializer|constant folding|unused (nodes|functions)")


def _record(name: str, level: int, pathname: str, msg: str) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": name,
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "pathname": pathname,
            "msg": msg,
        }
    )


@pytest.fixture()
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in logs.NOISY}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for n, lv in levels.items():
        logging.getLogger(n).setLevel(lv)
    logs.configure(False)


def _emit_all() -> None:
    site = os.path.join(os.path.dirname(os.__file__), "site-packages")
    own = os.path.join(logs._ROOT, "madclip_export", "export.py")
    for rec in (
        _record(
            "onnxscript.optimizer._constant_folding",
            logging.INFO,
            site + "/onnxscript/x.py",
            "ONNXSCRIPT-INFO",
        ),
        _record(
            "root", logging.WARNING, site + "/onnxruntime/quantization/quantize.py", "ORT-QUANT-WARNING"
        ),  # onnxruntime logs on the root logger
        _record("highdicom.base", logging.INFO, site + "/highdicom/base.py", "HIGHDICOM-INFO"),
        _record("madclip_export.export", logging.INFO, own, "MADCLIP-STEP"),
        _record("root", logging.INFO, own, "MADCLIP-ROOT"),
    ):  # madclip code on the root logger
        logging.getLogger().handle(rec)
    warnings.warn_explicit(
        "LIB-WARNING",
        UserWarning,
        site + "/onnxconverter_common/float16.py",
        70,
        module="onnxconverter_common.float16",
    )
    warnings.warn_explicit("OWN-WARNING", UserWarning, own, 1, module="madclip_export.export")


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, ""))


def test_quiet_by_default_everything_with_verbose(restore_logging, capsys):
    with warnings.catch_warnings():
        warnings.showwarning = _show  # pytest records warnings; print them as a plain run would
        setup_logging(False)
        _emit_all()
    err = capsys.readouterr().err
    assert "MADCLIP-STEP" in err and "MADCLIP-ROOT" in err and "OWN-WARNING" in err
    for foreign in ("ONNXSCRIPT-INFO", "ORT-QUANT-WARNING", "HIGHDICOM-INFO", "LIB-WARNING"):
        assert foreign not in err
    assert logging.getLogger("onnxscript").getEffectiveLevel() >= logging.ERROR  # dropped at the source too
    with warnings.catch_warnings():
        warnings.showwarning = _show
        setup_logging(True)
        _emit_all()
    err = capsys.readouterr().err
    for text in ("MADCLIP-STEP", "ONNXSCRIPT-INFO", "ORT-QUANT-WARNING", "HIGHDICOM-INFO", "LIB-WARNING"):
        assert text in err


def test_loggers_with_their_own_handlers_are_quieted(restore_logging, capsys):
    """Ray-style: a library logger with its own stderr handler and propagation off."""
    lib = logging.getLogger("somelib_with_handler")
    handler = logging.StreamHandler(sys.stderr)
    lib.addHandler(handler)
    lib.propagate = False
    try:
        setup_logging(False)
        lib.warning("LIB-OWN-HANDLER")
        assert "LIB-OWN-HANDLER" not in capsys.readouterr().err
        setup_logging(True)
        lib.warning("LIB-OWN-HANDLER")
        assert "LIB-OWN-HANDLER" in capsys.readouterr().err
    finally:
        lib.removeHandler(handler)


def _export(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from madclip_export.cli import main; sys.exit(main())",
        str(run),
        "--out",
        str(out),
        "--fp16",
        "--int8",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def test_real_export_prints_only_madclip_lines(trained_tiny_run, tmp_path):
    quiet = _export(trained_tiny_run, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    out = quiet.stdout + quiet.stderr
    assert not FOREIGN.search(out), [line for line in out.splitlines() if FOREIGN.search(line)][:5]
    assert not [line for line in out.splitlines() if line.startswith("WARNING")]
    assert out.count("TensorRT engine not built here") <= 1
    assert "bundle written" in out and "exporting the FP32 ONNX graph" in out
    assert len([line for line in out.splitlines() if line.strip()]) < 40, out
    # the same export with -v shows what the quiet one hid (so the check above can fail)
    loud = _export(trained_tiny_run, tmp_path / "loud", "-v")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert ONNXSCRIPT.search(loud.stdout + loud.stderr)


def test_pyproject_builds_without_deprecation_warnings():
    """setuptools reads pyproject.toml without a deprecation of our own making (the license as a table)."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    root = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    try:
        os.chdir(root)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_configuration(Distribution(), str(root / "pyproject.toml"))
    finally:
        os.chdir(cwd)
    assert not [str(w.message) for w in caught], setuptools.__version__


def _console_scripts() -> dict[str, str]:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_cli_has_verbose(name, capsys):
    """Every console script offers -v/--verbose (the switch that shows other libraries' output)."""
    import importlib

    module, func = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--verbose" in capsys.readouterr().out
