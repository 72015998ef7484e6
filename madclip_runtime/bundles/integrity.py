"""Tamper evidence for metadata.json: a digest of every field, so an edited value is refused by name.

metadata.json's `files` entry already carries the sha256 of every other file of the bundle; this module covers
metadata.json itself. At export, `seal(meta)` adds

    "integrity": {"scheme": "madclip-fields-sha256-1",
                  "fields": {"calibration.threshold": sha256, "preprocess.image_size": sha256, ...},
                  "digest": sha256 of the canonical JSON of the whole metadata minus integrity and signature}

A field is a top-level key, or `key.subkey` for a top-level object (`files.model.onnx`, `calibration.method`).
Each digest is the sha256 of the field's canonical JSON (sorted keys, no spaces, ASCII, NaN written as NaN so
that an edited non-finite value is still caught). `check(meta, where)` recomputes them and names the first
field that was edited, added or removed. The digests stop accidental and casual edits; an adversary who
recomputes them is stopped by the optional Ed25519 signature (`madclip_runtime.bundles.signing`), which covers the
canonical JSON of everything but the signature itself, integrity record included.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import BundleError

SCHEME = "madclip-fields-sha256-1"
UNSEALED_KEYS = ("integrity", "signature")
# Checked first, so the message names the decision-relevant field when several changed.
_PRIORITY = (
    "calibration",
    "preprocess",
    "input",
    "outputs",
    "models",
    "max_batch",
    "opset",
    "method",
    "files",
)


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII only; NaN/inf kept (so they can be detected)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode(
        "ascii"
    )


def _sha(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def sealed_part(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata without its integrity record and signature (what the digests describe)."""
    return {k: v for k, v in meta.items() if k not in UNSEALED_KEYS}


def field_digests(meta: dict[str, Any]) -> dict[str, str]:
    """{field name: sha256} for every top-level key and every key of a top-level object (see module docstring)."""
    out: dict[str, str] = {}
    for key, value in sealed_part(meta).items():
        out[key] = _sha(value)
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = _sha(v)
    return out


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` plus its integrity record (any old record or signature is dropped: sign after sealing)."""
    body = sealed_part(meta)
    return {**body, "integrity": {"scheme": SCHEME, "fields": field_digests(body), "digest": _sha(body)}}


def _order(name: str) -> tuple[int, int, str]:
    """Decision-relevant sections first; within a section, the precise `key.subkey` before the whole `key`."""
    top = name.split(".", 1)[0]
    return (_PRIORITY.index(top) if top in _PRIORITY else len(_PRIORITY), 0 if "." in name else 1, name)


def check(meta: dict[str, Any], where: str) -> None:
    """Refuse metadata whose fields differ from its integrity record: one BundleError line naming the field."""
    record = meta.get("integrity")
    if not isinstance(record, dict) or record.get("scheme") != SCHEME:
        raise BundleError(
            f"{where}: integrity: missing or of an unknown scheme (expected {SCHEME}); the metadata "
            f"cannot be verified: re-export the bundle with madclip-export"
        )
    recorded = record.get("fields")
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        raise BundleError(f"{where}: integrity.fields: malformed integrity record")
    actual = field_digests(meta)
    for name in sorted(set(recorded) | set(actual), key=_order):
        if name not in actual:
            raise BundleError(f"{where}: tampered: field {name} was removed after export")
        if name not in recorded:
            raise BundleError(f"{where}: tampered: field {name} was added after export")
        if recorded[name] != actual[name]:
            raise BundleError(
                f"{where}: tampered: field {name} was edited after export (its digest does not "
                f"match the integrity record); re-export the bundle"
            )
    if record.get("digest") != _sha(sealed_part(meta)):
        raise BundleError(f"{where}: tampered: integrity.digest does not match the metadata")
