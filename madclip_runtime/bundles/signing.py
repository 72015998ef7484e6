"""Optional Ed25519 signatures of a bundle's metadata.json (through the `cryptography` package).

The signature covers the canonical JSON (`madclip_runtime.bundles.integrity.canonical_json`) of the whole metadata
except the `signature` entry itself: every field, the integrity record, and through `files` the sha256 of
every model, golden and report file. So a verified signature vouches for the whole bundle, provided the
files are hashed too (`load_bundle` hashes at least the model variant in use and golden.npz).

    "signature": {"algorithm": "ed25519", "key_id": first 16 hex digits of sha256(raw public key),
                  "public_key": base64 raw 32-byte key, "value": base64 64-byte signature}

Keys are PEM files: a PKCS#8 private key (`madclip-keygen`, or `openssl genpkey -algorithm ed25519`) and a
SubjectPublicKeyInfo public key (`openssl pkey -in KEY -pubout`). Raw 32-byte keys in base64 are accepted too.
Without a trusted key a signature is still checked against the key it names (catching edits) and logged as
"not checked against a trusted key" (or skipped with a warning where `cryptography` is not installed: the
per-field digests still apply); with one (`load(..., trusted_key=...)`, `madclip-infer --trusted-key`)
an unsigned bundle or one signed by any other key is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from typing import Any

from ..errors import BackendUnavailable, BundleError, MadclipError
from .integrity import canonical_json

log = logging.getLogger(__name__)

ALGORITHM = "ed25519"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BackendUnavailable(
            "signing needs the 'cryptography' package (pip install cryptography)"
        ) from None
    return ed25519


def _read(path: str | os.PathLike, what: str) -> bytes:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as exc:
        raise MadclipError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not data.strip():
        raise MadclipError(f"{path}: empty {what} file")
    return data


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw_public(pub: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(path: str | os.PathLike) -> Any:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file; MadclipError naming the file otherwise."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise MadclipError(
            f"{os.fspath(path)}: the private key is encrypted; decrypt it first "
            f"(openssl pkey -in KEY -out PLAIN_KEY)"
        ) from None
    except (ValueError, binascii.Error):
        raise MadclipError(f"{os.fspath(path)}: not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise MadclipError(
            f"{os.fspath(path)}: not an Ed25519 key ({type(key).__name__}); generate one with madclip-keygen"
        )
    return key


def load_public_key(path_or_key: str | os.PathLike | bytes) -> Any:
    """An Ed25519 public key from a PEM file, a file holding the base64 raw key, or raw 32 bytes."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    if isinstance(path_or_key, bytes) and len(path_or_key) == 32:
        return ed25519.Ed25519PublicKey.from_public_bytes(path_or_key)
    where = os.fspath(path_or_key) if not isinstance(path_or_key, bytes) else "<key bytes>"
    data = path_or_key if isinstance(path_or_key, bytes) else _read(path_or_key, "public key")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise MadclipError(
            f"{where}: not an Ed25519 public key (PEM, or base64 of the raw 32 bytes)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise MadclipError(f"{where}: not an Ed25519 public key ({type(key).__name__})")
    return key


def _payload(meta: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in meta.items() if k != "signature"})


def sign_metadata(meta: dict[str, Any], private_key: Any) -> dict[str, Any]:
    """`meta` with a `signature` entry over everything else (call after `integrity.seal`)."""
    raw = _raw_public(private_key.public_key())
    value = private_key.sign(_payload(meta))
    return {
        **{k: v for k, v in meta.items() if k != "signature"},
        "signature": {
            "algorithm": ALGORITHM,
            "key_id": key_id(raw),
            "public_key": base64.b64encode(raw).decode(),
            "value": base64.b64encode(value).decode(),
        },
    }


def verify_signature(meta: dict[str, Any], where: str, trusted_key: Any = None) -> str | None:
    """Check the metadata's signature. Returns the signer's key id, or None for an unsigned bundle.

    `trusted_key` (a key object, a path or raw bytes): the bundle must be signed by exactly that key.
    Without it, a present signature is verified against the key it names (catching edits, not origin).
    """
    if trusted_key is None and meta.get("signature") is not None:
        try:
            _crypto()
        except BackendUnavailable:  # a serving machine without the extra: the per-field digests still apply
            log.warning(
                "%s: bundle is signed, but the signature is not checked ('cryptography' is not installed; "
                'pip install "madclip[sign]" and pass a trusted key to check it)',
                where,
            )
            return None
    ed25519 = _crypto()
    trusted = None
    if trusted_key is not None:  # a bad key file is the user's first problem: report it before the bundle's
        trusted = (
            trusted_key if isinstance(trusted_key, ed25519.Ed25519PublicKey) else load_public_key(trusted_key)
        )
    sig = meta.get("signature")
    if sig is None:
        if trusted is not None:
            raise BundleError(
                f"{where}: unsigned bundle refused (a trusted key was given; sign it with "
                f"madclip-export --sign KEY)"
            )
        return None
    from cryptography.exceptions import InvalidSignature

    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise BundleError(f"{where}: signature: malformed or not {ALGORITHM}")
    try:
        raw = base64.b64decode(str(sig.get("public_key", "")), validate=True)
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
        signer = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise BundleError(f"{where}: signature: malformed public key or value") from None
    if trusted is not None:
        if _raw_public(trusted) != raw:
            raise BundleError(
                f"{where}: signed by key {key_id(raw)}, not by the trusted key "
                f"{key_id(_raw_public(trusted))}: refused"
            )
        signer = trusted
    try:
        signer.verify(value, _payload(meta))
    except InvalidSignature:
        raise BundleError(
            f"{where}: signature does not match the metadata (edited after signing): refused"
        ) from None
    if trusted is None:
        log.info(
            "%s: signed by key %s (not checked against a trusted key: pass --trusted-key)", where, key_id(raw)
        )
    return key_id(raw)


def generate_keypair(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Write a new Ed25519 private key (PEM PKCS#8, mode 0600) and its public key (PEM). Returns the key id."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    from ..atomic import atomic_write_text

    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path, public_path = os.fspath(private_path), os.fspath(public_path)
    for p in (private_path, public_path):
        if os.path.exists(p):
            raise MadclipError(f"{p}: already exists (refusing to overwrite a key)")
    tmp = f"{private_path}.tmp-{os.getpid()}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
    )  # never readable by others, not even briefly
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, private_path)  # atomic, and fails rather than overwrite a key created meanwhile
    finally:
        os.unlink(tmp)
    atomic_write_text(public_path, public_pem.decode("ascii"))
    return key_id(_raw_public(key.public_key()))
