"""One place that decides what reaches the terminal: madclip's own log lines always, other libraries' only
with -v.

A normal run prints madclip's lines and progress only. Everything another library says (onnxscript's
optimiser INFO lines, onnxruntime's quantiser advice and C++ warnings, highdicom's "copy attributes" lines,
Ray's start-up notices, open_clip's, torch's and numpy's warnings) is shown with `-v` / `--verbose`.

How a CLI uses it: `madclip_runtime.cli.common.setup_logging(verbose)` calls `configure(verbose)`; every
madclip CLI calls `setup_logging` first thing (and gets `-v` from `add_verbose(parser)` or its own flag).
Code that imports a library which installs its own handlers at import time (Ray) calls `quiet_loaded()`
after that import. `is_verbose()` tells helpers whether to pass a library its quiet settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .contract import OPENVINO

OWN_PACKAGES = ("madclip_runtime", "madclip_train", "madclip_export")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory holding the packages
_OWN_DIRS = tuple(os.path.join(_ROOT, p) + os.sep for p in OWN_PACKAGES)
_OWN_WARNINGS = r"(madclip_runtime|madclip_train|madclip_export)(\.|$)"
# Libraries whose loggers get their level raised (dropped at the source; "ray.serve" is left to the filter:
# madclip's serving code logs on it)
NOISY = (
    "onnxscript",
    "torch.onnx",
    "torch._dynamo",
    "torch.export",
    "onnx_ir",
    "onnxruntime",
    "highdicom",
    "pydicom",
    "ray",
    "ray.data",
    "ray.train",
    "open_clip",
    "PIL",
    "matplotlib",
    "urllib3",
    "filelock",
    "httpx",
    "nncf",
    OPENVINO,
)
_state = {"verbose": False}


def is_verbose() -> bool:
    return _state["verbose"]


def is_own(record: logging.LogRecord) -> bool:
    """A madclip record: its logger is one of madclip's, or the call was made from madclip's source files
    (some libraries log on the root logger, and madclip's modules may log under another name)."""
    name = record.name or ""
    if any(name == p or name.startswith(p + ".") for p in OWN_PACKAGES) or name == "madclip":
        return True
    path = os.path.abspath(record.pathname or "")
    return path.startswith(_OWN_DIRS)


class OwnOnly(logging.Filter):
    """Lets madclip's records through; other libraries' only when verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _state["verbose"] or is_own(record)


_FILTER = OwnOnly()


def _configure_warnings(verbose: bool) -> None:
    """Python warnings: all shown once per place with -v; otherwise only those attributed to madclip code."""
    warnings.resetwarnings()
    if verbose:
        warnings.simplefilter("default")
        return
    warnings.simplefilter("ignore")
    warnings.filterwarnings("default", module=_OWN_WARNINGS)
    # Child processes are not touched: Ray's workers write to Ray's log files (madclip starts Ray with
    # log_to_driver=False), and RAY_BACKEND_LOG_LEVEL would make Ray's C++ core print a line of its own.


def quiet_loaded() -> None:
    """Apply the rule to loggers that libraries configured themselves (own handlers, propagate off) and to
    onnxruntime's C++ logger; call again after importing such a library."""
    level = logging.DEBUG if _state["verbose"] else logging.ERROR
    for name in NOISY:
        logging.getLogger(name).setLevel(level if not _state["verbose"] else logging.NOTSET)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            for handler in logger.handlers:
                if _FILTER not in handler.filters:
                    handler.addFilter(_FILTER)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "set_default_logger_severity"):
        ort.set_default_logger_severity(0 if _state["verbose"] else 3)  # 3: errors only


def configure(verbose: bool = False) -> None:
    """Set madclip's quiet-by-default rule for logs and warnings (verbose: everything, DEBUG included)."""
    _state["verbose"] = bool(verbose)
    _configure_warnings(bool(verbose))
    logging.captureWarnings(False)
    quiet_loaded()


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """The `-v/--verbose` flag every madclip CLI has."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show other libraries' log lines and warnings, and debug details",
    )
