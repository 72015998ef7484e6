"""Shared CLI plumbing: logging setup, the one-line error contract (no traceback, non-zero exit), validated
numeric options and an argument parser whose errors are one line.

Every madclip CLI builds its parser with `ArgumentParser`, types its numeric options with `finite_float` /
`bounded_int` (NaN, infinities and out-of-range values refused with one line, exit 2), calls
`setup_logging(verbose)` and runs its body through `run_cli`. Names that reach the terminal go through
`madclip_runtime.safe_text.escape_control`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import traceback
from typing import Callable, NoReturn

from rich.console import Console
from rich.logging import RichHandler

from .. import logs
from ..errors import MadclipError
from ..safe_text import escape_control

# Exit codes shared by every madclip CLI.
EXIT_OK = 0
EXIT_FAILED = 1  # some inputs failed, others processed
EXIT_USAGE = 2  # bad input / configuration: nothing useful done

# Wide when not a terminal (logs, CI), so log lines are not wrapped at 80 columns.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


_state = {"verbose": False}
HINT_VERBOSE = "run with -v for details"


class _EscapeFilter(logging.Filter):
    """Shows control characters in log messages escaped (a file name cannot forge lines or drive the terminal)
    and, unless verbose, drops open_clip's INFO/DEBUG chatter (it logs on the root logger; warnings are kept)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.verbose and record.levelno < logging.WARNING and _from_open_clip(record):
            return False
        message = record.getMessage()
        safe = escape_control(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def _from_open_clip(record: logging.LogRecord) -> bool:
    parts = os.path.normpath(record.pathname or "").split(os.sep)
    return record.name.startswith("open_clip") or "open_clip" in parts


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with -v) to stderr through rich; other libraries' log lines and warnings only with -v
    (`madclip_runtime.logs`, the one place that decides it)."""
    _state["verbose"] = bool(verbose)
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    handler.addFilter(_EscapeFilter(bool(verbose)))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )
    logs.configure(verbose)


def error_line(message: str) -> None:
    """Print one error line on stderr (markup off, control characters escaped so names print inertly)."""
    err_console.print(
        f"error: {escape_control(message)}", style="bold red", markup=False, highlight=False, soft_wrap=True
    )


# ------------------------------------------------------------------------------------------ argument parsing


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors ("prog: error: ... (see --help)", exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {escape_control(message)} (see --help)\n")


def _parse_number(text: str, kind: type) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {escape_control(repr(text))}") from None


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def finite_float(
    min: float | None = None, max: float | None = None, *, min_open: bool = False, max_open: bool = False
) -> Callable[[str], float]:
    """argparse `type=` for a finite float within optional bounds (`min_open`: strictly greater than min).

    NaN and +-inf are refused whatever the bounds: they pass every comparison test silently otherwise.
    """

    def parse(text: str) -> float:
        value = float(_parse_number(text, float))
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (min is not None and (value < min or (min_open and value == min))) or (
            max is not None and (value > max or (max_open and value == max))
        ):
            raise argparse.ArgumentTypeError(
                f"must be {_bounds_text(min, max, min_open, max_open)}, got {text}"
            )
        return value

    parse.__name__ = "finite float"
    return parse


def bounded_int(min: int | None = None, max: int | None = None) -> Callable[[str], int]:
    """argparse `type=` for an integer within optional inclusive bounds."""

    def parse(text: str) -> int:
        value = int(_parse_number(text.strip(), int))
        if (min is not None and value < min) or (max is not None and value > max):
            raise argparse.ArgumentTypeError(f"must be {_bounds_text(min, max, False, False)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds like Ctrl-C: atomic writers remove their temporaries."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _unexpected(exc: BaseException) -> int:
    """The safety net: an exception no check anticipated -> one line (+ traceback with -v), exit 1."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if _state["verbose"]:
        sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        error_line(f"unexpected {type(exc).__name__}: {first}")
    else:
        error_line(f"unexpected {type(exc).__name__}: {first} ({HINT_VERBOSE})")
    return EXIT_FAILED


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; MadclipError, KeyboardInterrupt, SIGTERM and OSError become one line and a non-zero exit.

    Anything else is a bug or an unanticipated condition: one line naming the exception and "run with -v for
    details", exit 1 (with -v the traceback is printed too). No traceback reaches a user otherwise.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return int(main() or 0)
    except Terminated:
        error_line("terminated (SIGTERM)")
        return 128 + signal.SIGTERM
    except MadclipError as exc:
        error_line(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except OSError as exc:  # e.g. unwritable output directory, disk full
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        error_line(f"{where}{exc.strerror or exc}")
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the safety net, see the docstring
        return _unexpected(exc)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
