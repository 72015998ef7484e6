"""Encoded scan bytes (an HTTP request body) -> ScanImage slices, with the runtime's own readers.

The bytes go to a private temporary file that `madclip_runtime.scans.imageio.read_scans` reads exactly as it reads
a local file, so a scan sent to the server decodes to the same pixels as `madclip-infer scan.png` (same
PIL path, same DICOM/NIfTI windowing, same header-first size check and decompression-bomb refusal, same
truncation errors). The file type comes from the client's file name when it has a known scan extension,
else from the content's magic bytes (PNG, JPEG, TIFF, BMP, DICOM, NIfTI). Errors are InputErrors naming
the client's file name, never the temporary path.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from ..errors import InputError
from ..scans.imageio import SCAN_EXTENSIONS, ScanImage, read_scans

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # 64 MiB: a large uncompressed CT slice stack still fits

# (offset, magic, suffix): first match wins.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", ".png"),
    (0, b"\xff\xd8\xff", ".jpg"),
    (0, b"II*\x00", ".tif"),
    (0, b"MM\x00*", ".tif"),
    (0, b"BM", ".bmp"),
    (128, b"DICM", ".dcm"),
    (344, b"n+1\x00", ".nii"),
    (0, b"\x1f\x8b", ".nii.gz"),  # gzip: the only compressed scan format the runtime reads
)


def sniff_suffix(data: bytes) -> str | None:
    """The scan file suffix the content looks like, or None."""
    for offset, magic, suffix in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return suffix
    return None


def _name_suffix(name: str) -> str | None:
    lower = os.path.basename(name).lower()
    for ext in sorted(SCAN_EXTENSIONS, key=len, reverse=True):  # ".nii.gz" before ".gz"-less ".nii"
        if lower.endswith(ext):
            return ext
    return None


def decode_scan_bytes(
    data: bytes,
    name: str = "<request>",
    slice_index: int | None = None,
    window: str = "auto",
    max_bytes: int = DEFAULT_MAX_BODY_BYTES,
    tmp_dir: str | None = None,
) -> list[ScanImage]:
    """Bytes of one scan file -> its 2-D slices (sources named after `name`, "name#slice=N" for volumes).

    InputError (one line naming `name`) for an empty or oversized body, an unrecognised format, or anything
    the file readers refuse (corrupt, truncated, too many pixels, decompression bomb, unsupported mode).
    """
    if not data:
        raise InputError(f"{name}: empty request body (0 bytes)")
    if len(data) > max_bytes:
        raise InputError(f"{name}: {len(data)} bytes, over the limit of {max_bytes} bytes")
    suffix = _name_suffix(name) or sniff_suffix(data)
    if suffix is None:
        raise InputError(f"{name}: not a recognised scan format (PNG, JPEG, TIFF, BMP, DICOM or NIfTI)")
    fd, tmp = tempfile.mkstemp(prefix="madclip-req-", suffix=suffix, dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            scans = read_scans(tmp, slice_index=slice_index, window=window)
        except InputError as exc:
            raise InputError(str(exc).replace(tmp, name)) from None
        except (ArithmeticError, LookupError, ValueError, TypeError, AttributeError, OSError) as exc:
            # a reader that tripped over this file's content (e.g. LinAlgError on a NaN affine): the
            # request's 400, not the server's 500
            text = (str(exc).strip().splitlines() or [""])[0].replace(tmp, name)
            raise InputError(f"{name}: cannot read this scan ({type(exc).__name__}: {text})") from None
    finally:
        os.remove(tmp)
    return [dataclasses.replace(s, source=s.source.replace(tmp, name, 1)) for s in scans]
