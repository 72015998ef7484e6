"""Shared CLI plumbing: logging setup and the one-line error contract (no traceback, non-zero exit)."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable

from rich.console import Console
from rich.logging import RichHandler

from .errors import MadclipError

# Exit codes shared by every madclip CLI.
EXIT_OK = 0
EXIT_FAILED = 1  # some inputs failed, others processed
EXIT_USAGE = 2  # bad input / configuration: nothing useful done

# Wide when not a terminal (logs, CI), so log lines are not wrapped at 80 columns.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )


def error_line(message: str) -> None:
    """Print one error line on stderr (markup disabled so file names print verbatim)."""
    err_console.print(f"error: {message}", style="bold red", markup=False, highlight=False, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so it unwinds like Ctrl-C: atomic writers remove their temporaries."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; MadclipError, KeyboardInterrupt, SIGTERM and OSError become one line and a non-zero exit."""
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
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
