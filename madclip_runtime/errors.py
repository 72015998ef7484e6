"""User-facing errors: one line, naming the file and what is wrong.

Library code raises these; the CLIs catch them and print the message without a traceback (see
`madclip_runtime.cli.common.run_cli`).
"""

from __future__ import annotations


class MadclipError(Exception):
    """A problem the user can fix (bad input, missing file, wrong option). Message is one line."""


class InputError(MadclipError):
    """An input image/scan could not be read or is unusable."""


class BundleError(MadclipError):
    """A bundle is missing files, tampered with, or of an unknown schema."""


class BackendUnavailable(MadclipError):
    """The requested inference backend (onnxruntime provider, TensorRT) is not available here."""
