"""`madclip-infer --server URL`: score scans on a madclip-serve endpoint, write what local inference writes.

Each file's bytes are POSTed as they are on disk (the server decodes them with the same readers), a few
requests in flight at once so the server can batch them. The records printed (table or --json) and the
files written with --out (<stem>.json, <stem>_overlay.png, <stem>_map.png/.npy) are those of local
inference: the server returns the float32 anomaly map, the overlay is drawn here from the scan read with the
bundle's windowing (from GET /metadata). Standard library HTTP only: a client needs no Ray.

With --trusted-key the client verifies what answers before sending any scan (`verify_server_bundle`): the
server publishes its bundle's metadata.json exactly as on disk; its sha256 must be the advertised bundle id,
its integrity record must hold, and its signature must be by the trusted key (the same rules and messages as
local loading: an unsigned bundle or another signer is refused in one line, exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from rich.console import Console

from ..cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, err_console, error_line
from ..cli.results import check_out_dir, expand_each, output_stem, result_table
from ..contract import ANOMALY_MAP, SCORE, SCORE_MAP_MAX
from ..errors import BundleError, InputError, MadclipError
from ..predictor import Prediction
from .maps import decode_map

log = logging.getLogger(__name__)

CLIENT_CONCURRENCY = 4  # requests in flight: enough for the server to form batches, polite to a shared one
TIMEOUT_S = 300.0


class RemoteError(InputError):
    """The server refused or failed one request: reported for that file, the others go on."""


def _url(base: str, path: str, params: dict[str, Any] | None = None) -> str:
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
    return f"{base.rstrip('/')}{path}" + (f"?{query}" if query else "")


def _open(req: urllib.request.Request | str, timeout: float) -> dict[str, Any]:
    """One HTTP exchange -> JSON. 4xx -> RemoteError with the server's line; unreachable -> MadclipError."""
    url = req if isinstance(req, str) else req.full_url
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read().decode("utf-8")).get("error") or exc.reason
        except (ValueError, AttributeError, OSError):
            message = exc.reason
        if 400 <= exc.code < 500:
            raise RemoteError(str(message)) from None
        if exc.code == 503:  # busy or shutting down: not this file's fault, but nothing to retry here
            raise RemoteError(f"server unavailable (503: {message})") from None
        raise RemoteError(f"server error {exc.code} ({message})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MadclipError(f"{url}: cannot reach the madclip server ({reason})") from None


def server_metadata(base: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET /metadata of a madclip-serve endpoint."""
    try:
        meta = _open(_url(base, "/metadata"), timeout)
    except RemoteError as exc:
        raise MadclipError(f"{base}: GET /metadata refused ({exc})") from None
    if "map_scale" not in meta or "bundle_sha256" not in meta:
        raise MadclipError(f"{base}: does not look like a madclip-serve endpoint (no bundle metadata)")
    return meta


def trusted_key_id(trusted_key: Any) -> str:
    """The key id (as in a bundle's signature) of a public key: a path, PEM/raw bytes or a key object."""
    from cryptography.hazmat.primitives import serialization

    from ..bundles.signing import key_id, load_public_key

    key = trusted_key if hasattr(trusted_key, "public_bytes") else load_public_key(trusted_key)
    return key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def verify_server_bundle(meta: dict[str, Any], base: str, trusted_key: Any) -> str:
    """Check with `trusted_key` that the server serves a bundle signed by it. Returns the signer's key id.

    The published metadata.json must hash to the advertised `bundle_sha256`, pass the integrity record of
    every field, and carry a signature by the trusted key (`bundles.signing.verify_signature`: the rules and
    messages of local loading). BundleError (one line) otherwise. The server vouches that its replicas
    verified the model files against this metadata before serving.
    """
    import base64
    import binascii
    import hashlib

    from ..bundles import integrity
    from ..bundles.signing import load_public_key, verify_signature

    key = load_public_key(trusted_key)  # a bad key file is the user's first problem
    where = f"{base} (bundle {meta.get('bundle')})"
    doc = meta.get("bundle_metadata")
    if not isinstance(doc, str):
        raise BundleError(
            f"{where}: the server does not publish its bundle's metadata and signature "
            "(an older madclip-serve?): cannot verify it with --trusted-key; refused"
        )
    try:
        raw = base64.b64decode(doc, validate=True)
        published = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{where}: published bundle metadata unreadable ({exc}); refused") from None
    if hashlib.sha256(raw).hexdigest() != meta.get("bundle_sha256"):
        raise BundleError(
            f"{where}: published bundle metadata does not match the advertised bundle_sha256; refused"
        )
    if not isinstance(published, dict):
        raise BundleError(f"{where}: published bundle metadata is not a JSON object; refused")
    integrity.check(published, where)
    signer = verify_signature(published, where, key)
    return str(signer)


def predict_remote(
    base: str,
    data: bytes,
    name: str,
    slice_index: int | None = None,
    map_format: str | None = None,
    threshold: float | None = None,
    timeout: float = TIMEOUT_S,
) -> list[dict[str, Any]]:
    """POST one scan file's bytes -> one record per slice (with `anomaly_map` when map_format is given)."""
    params = {"name": name, "slice": slice_index, "map": map_format, "threshold": threshold}
    req = urllib.request.Request(
        _url(base, "/predict", params),
        data=data,
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    doc = _open(req, timeout)
    return list(doc["slices"]) if "slices" in doc else [doc]


def remote_prediction(record: dict[str, Any], anomaly_map: np.ndarray) -> Prediction:
    """A server's record and map as the Prediction local inference would hold (for writing the same files)."""
    nan = float("nan")
    return Prediction(
        source=record["file"],
        score=nan if record[SCORE] is None else float(record[SCORE]),
        score_map_max=nan if record[SCORE_MAP_MAX] is None else float(record[SCORE_MAP_MAX]),
        label=record["label"],
        threshold=record["threshold"],
        score_name=record["score_name"],
        anomaly_map=anomaly_map,
        model_map=np.zeros((0, 0), np.float32),
        timings=dict(record["timings_ms"]),
    )


def _score_file(args: argparse.Namespace, path: str, want_map: bool) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None
    try:
        return predict_remote(
            args.server, data, path, args.slice, "npy" if want_map else None, args.threshold
        )
    except RemoteError as exc:
        text = str(exc)
        raise RemoteError(text if path in text else f"{path}: {text}") from None


def run_remote(args: argparse.Namespace) -> int:
    """The body of `madclip-infer --server URL` (`args` from madclip-infer's parser): the same input
    expansion, records, table and files as local inference (`madclip_runtime.outputs`)."""
    from .. import INTENDED_USE

    if args.selftest:
        raise MadclipError(
            "--selftest runs on the serving machine (madclip-infer --bundle B --selftest there); "
            "the server already ran the bundle's golden inputs before it became ready"
        )
    meta = server_metadata(args.server)
    signer = None
    if getattr(args, "trusted_key", None):
        signer = verify_server_bundle(meta, args.server, args.trusted_key)
    files, failed = expand_each(args.inputs, args.recursive, [args.out] if args.out else [])
    if (
        args.slice is None and files
    ):  # locally a volume gets one answer per volume: never a silent per-slice answer
        from ..scans.volume import plan_volumes

        jobs, files, plan_errors = plan_volumes(files, args.series, args.volume_index)
        for message in plan_errors + [
            f"{job.source}: a volume is scored as one volume by local "
            f"inference (madclip-infer --bundle B; madclip-batch gives per-slice "
            f"rows); "
            f"--server scores 2-D scans, or one slice of it with --slice k"
            for job in jobs
        ]:
            error_line(message)
        failed += len(plan_errors) + len(jobs)
    if not files:
        return EXIT_USAGE
    out_dir = check_out_dir(args.out) if args.out else None
    trust = f"signed by trusted key {signer}" if signer else "signature not checked (no --trusted-key)"
    err_console.print(
        f"madclip-infer: server {args.server} ({meta['bundle']}, sha256 {meta['bundle_sha256'][:12]}, "
        f"{trust}), "
        f"backend {meta['backend']} (provider {meta['provider']}), precision {meta['precision']}, threshold "
        f"{args.threshold if args.threshold is not None else meta['threshold']} on {meta['score_name']}; "
        f"{len(files)} file(s); {INTENDED_USE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    from ..overlay import save_prediction
    from ..scans.imageio import read_scans

    def work(path: str) -> tuple[str, list[dict[str, Any]] | InputError]:
        try:
            return path, _score_file(args, path, out_dir is not None)
        except InputError as exc:
            return path, exc

    rows: list[dict[str, Any]] = []
    n_failed, used_stems = failed, set()

    def results():  # in file order, as local inference prints them; a bounded window of files in memory
        with ThreadPoolExecutor(max_workers=CLIENT_CONCURRENCY) as pool:
            window = 4 * CLIENT_CONCURRENCY
            for start in range(0, len(files), window):
                yield from pool.map(work, files[start : start + window])

    for path, result in results():
        if isinstance(result, InputError):
            error_line(str(result))
            n_failed += 1
            continue
        try:
            scans = read_scans(path, args.slice, window=meta["window"]) if out_dir is not None else None
        except InputError as exc:
            error_line(str(exc))
            n_failed += 1
            continue
        for i, record in enumerate(result):
            amap_doc = record.pop(ANOMALY_MAP, None)
            if out_dir is not None:
                t0 = time.perf_counter()
                stem = output_stem(record["file"], used_stems)
                save_prediction(
                    out_dir,
                    stem,
                    scans[i],
                    remote_prediction(record, decode_map(amap_doc)),
                    record,
                    tuple(meta["map_scale"]),
                    meta["map_threshold"],
                    args.map_format,
                )
                log.debug(
                    "%s: wrote %s/%s.* in %.1f ms",
                    record["file"],
                    out_dir,
                    stem,
                    (time.perf_counter() - t0) * 1e3,
                )
            if args.json:
                print(json.dumps(record, allow_nan=False), flush=True)
            rows.append(record)
    if not args.json and rows:
        Console(soft_wrap=True).print(result_table(rows))
    if n_failed:
        err_console.print(
            f"{len(rows)} scan(s) scored, {n_failed} input(s) failed",
            style="yellow",
            markup=False,
            highlight=False,
        )
        return EXIT_FAILED
    return EXIT_OK
