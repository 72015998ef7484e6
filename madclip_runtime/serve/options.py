"""The options of madclip-serve and of its config-file builder (`app.app_builder`), validated by one table.

Every numeric option has one validator here (`cli.common.finite_float` / `bounded_int`: NaN, infinities and
out-of-range values refused with one line), used as argparse `type=` by madclip-serve and applied to a Serve
config file's `args` by `serve_config_from`, so both refuse the same values before any replica starts.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ..cli.common import bounded_int, finite_float
from ..contract import FP32
from ..errors import MadclipError
from .decode import DEFAULT_MAX_BODY_BYTES
from .limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_UPLOADS, DEFAULT_MIN_UPLOAD_RATE

# One validator per numeric option, shared by the parser (type=) and the config-file builder (app_builder).
VALIDATORS: dict[str, Callable[[str], Any]] = {
    "port": bounded_int(1, 65535),
    "replicas": bounded_int(1),
    "target_ongoing": finite_float(0, min_open=True),
    "num_cpus": finite_float(0),
    "num_gpus": finite_float(0),
    "max_batch": bounded_int(1),
    "batch_wait_ms": finite_float(0),
    "max_ongoing": bounded_int(1),
    "max_body_mb": finite_float(0, min_open=True),
    "graceful_timeout": finite_float(0),
    "ray_num_cpus": bounded_int(1),
    "threshold": finite_float(0),
    "max_uploads": bounded_int(1),
    "body_timeout": finite_float(0, min_open=True),
    "min_upload_rate": finite_float(0),
    "keep_alive": finite_float(0, min_open=True),
}
DEFAULT_KEEP_ALIVE_S = 5.0  # idle keep-alive connections are closed after this (Ray's own default is 90 s)


def read_trusted_key(path: str | None) -> bytes | None:
    """The trusted public key's bytes (read once by the driver, shipped to the replicas), checked to be a key."""
    if path is None:
        return None
    from ..bundles.signing import load_public_key

    load_public_key(path)  # one line when it is not an Ed25519 public key
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise MadclipError(f"{path}: cannot read the trusted key ({exc.strerror or exc})") from None


def serve_config_from(values: dict[str, Any]) -> Any:
    """A ServeConfig from plain values (a config file's args), each checked by the option's own validator."""
    from .replica import ServeConfig

    def get(key: str, default: Any) -> Any:
        raw = values.get(key)
        if raw in (None, ""):
            return default
        try:
            return VALIDATORS[key](str(raw))
        except argparse.ArgumentTypeError as exc:
            raise MadclipError(f"{key} {exc}") from None

    return ServeConfig(
        bundle=str(values["bundle"]),
        backend=str(values.get("backend") or "auto"),
        precision=str(values.get("precision") or FP32),
        threshold=get("threshold", None),
        max_body_bytes=int(get("max_body_mb", DEFAULT_MAX_BODY_BYTES / 2**20) * 2**20),
        cache_dir=values.get("cache_dir"),
        trusted_key=read_trusted_key(values.get("trusted_key")),
        max_uploads=get("max_uploads", DEFAULT_MAX_UPLOADS),
        body_timeout_s=get("body_timeout", DEFAULT_BODY_TIMEOUT_S),
        min_upload_rate=get("min_upload_rate", DEFAULT_MIN_UPLOAD_RATE),
    )
