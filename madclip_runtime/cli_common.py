"""Shared CLI plumbing: logging setup and the one-line error contract (no traceback, non-zero exit)."""
from __future__ import annotations

import logging
import sys
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


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; MadclipError, KeyboardInterrupt and OSError become one line and a non-zero exit."""
    try:
        return int(main() or 0)
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
