"""madclip-infer --dicomweb URL --study UID [--series UID] --bundle B [--stow]: a study from a DICOMweb PACS.

Each image series of the study (or the one given with --series) is retrieved with WADO-RS (dicomweb-client,
instance by instance into a private temporary folder), read and scored exactly as a local series folder is
(`madclip_runtime.dicomnet.results`), printed like the volume path (a table, or one JSON object per series
with --json), written to --out like a local volume (the SEG file with --dicom-seg), and with --stow its DICOM
SEG and TID 1500 SR are stored back with STOW-RS. Series that are not images (SEG, SR, RT...) are skipped
with a log line.

Authentication: the Authorization header comes from --dicomweb-auth-file FILE (the header value, e.g. "Bearer
eyJ..." or "Basic dXNlcjpwYXNz"), else $MADCLIP_DICOMWEB_AUTH (same form), else $MADCLIP_DICOMWEB_TOKEN (a
bare bearer token). It is never printed and never accepted on the command line; dicomweb-client's and
urllib3's loggers stay at WARNING even with -v.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from typing import Any

from .. import INTENDED_USE
from ..errors import InputError, MadclipError

log = logging.getLogger(__name__)

ENV_AUTH, ENV_TOKEN = "MADCLIP_DICOMWEB_AUTH", "MADCLIP_DICOMWEB_TOKEN"


def add_dicomweb_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DICOMweb (a PACS instead of files; docs/hospital.md)")
    for flag, metavar, text in (
        (
            "--dicomweb",
            "URL",
            "DICOMweb root of the PACS (e.g. http://pacs:8042/dicom-web): retrieve with WADO-RS",
        ),
        ("--study", "UID", "StudyInstanceUID to score (with --dicomweb; --series UID keeps one series)"),
    ):
        g.add_argument(flag, default=None, metavar=metavar, help=text)
    g.add_argument(
        "--stow", action="store_true", help="store the SEG and SR of each series back with STOW-RS"
    )
    g.add_argument(
        "--dicomweb-auth-file",
        default=None,
        metavar="FILE",
        help=f"file holding the Authorization header value (else ${ENV_AUTH} or ${ENV_TOKEN})",
    )


def dicomweb_requested(args: argparse.Namespace) -> bool:
    """True with --dicomweb; its companion options without it are refused in one line."""
    if not args.dicomweb:
        for opt, value in (
            ("--study", args.study),
            ("--stow", args.stow),
            ("--dicomweb-auth-file", args.dicomweb_auth_file),
        ):
            if value:
                raise MadclipError(f"{opt} needs --dicomweb URL")
        return False
    if args.server:
        raise MadclipError("give --dicomweb or --server, not both")
    return True


def auth_header(path: str | None) -> str | None:
    """The Authorization header value from the file, or the environment; None when none is configured."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise MadclipError(f"{path}: cannot read --dicomweb-auth-file ({exc.strerror or exc})") from None
        if not value or "\n" in value:
            raise MadclipError(
                f"{path}: --dicomweb-auth-file must hold one line, the Authorization header value"
            )
        return value
    if os.environ.get(ENV_AUTH, "").strip():
        return os.environ[ENV_AUTH].strip()
    if os.environ.get(ENV_TOKEN, "").strip():
        return f"Bearer {os.environ[ENV_TOKEN].strip()}"
    return None


def _client(url: str, auth: str | None) -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise MadclipError(
            '--dicomweb needs dicomweb-client; install it with: pip install "madclip[pacs]"'
        ) from None
    for name in ("dicomweb_client", "urllib3", "requests", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)  # request lines may carry headers at DEBUG
    return DICOMwebClient(url=url.rstrip("/"), headers={"Authorization": auth} if auth else None, timeout=120)


def _http_error(url: str, exc: Exception) -> MadclipError:
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        hint = {
            401: f": give credentials with --dicomweb-auth-file or ${ENV_AUTH}",
            403: ": the credentials are not allowed to do this",
            404: ": not found",
        }.get(code, "")
        return MadclipError(f"{url}: DICOMweb answered HTTP {code} {exc.response.reason}{hint}")
    if isinstance(exc, requests.RequestException):
        return MadclipError(f"{url}: DICOMweb request failed ({type(exc).__name__})")
    return MadclipError(f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _uid(attrs: dict, tag: str) -> str:
    return str(((attrs.get(tag) or {}).get("Value") or [""])[0])


def run_dicomweb(args: argparse.Namespace, infer: Any) -> int:
    """The --dicomweb path of madclip-infer (`infer`: the CLI module, for its output helpers)."""
    import requests

    from ..bundles.bundle import load_bundle
    from ..cli.common import EXIT_FAILED, EXIT_OK, err_console, error_line
    from ..cli.volume import _volume_table
    from ..overlay import jsonable
    from ..predictor import load
    from ..scans.volume_output import save_volume_outputs
    from .node import image_sop_classes
    from .results import read_series, score_series

    if args.inputs:
        raise MadclipError("--dicomweb reads from the PACS: give no INPUT files")
    if not args.study:
        raise MadclipError("--dicomweb needs --study UID (the StudyInstanceUID to score)")
    if not args.bundle:
        raise MadclipError("--dicomweb needs --bundle")
    if args.slice is not None:
        raise MadclipError("--slice does not apply to --dicomweb (each series is scored as a volume)")
    client = _client(args.dicomweb, auth_header(args.dicomweb_auth_file))
    bundle = load_bundle(args.bundle, verify="model", precision=args.precision, trusted_key=args.trusted_key)
    try:
        found = client.search_for_series(study_instance_uid=args.study, get_remaining=True)
    except Exception as exc:  # noqa: BLE001 - requests/HTTP errors become one line
        raise _http_error(args.dicomweb, exc) from None
    series = [(_uid(s, "0020000E"), _uid(s, "00080060"), _uid(s, "00200011")) for s in found]
    if args.series:
        series = [s for s in series if s[0] == args.series]
        if not series:
            raise MadclipError(f"{args.dicomweb}: no series {args.series} in study {args.study}")
    if not series:
        raise MadclipError(f"{args.dicomweb}: study {args.study} has no series (or does not exist)")
    out_dir = infer.check_out_dir(args.out) if args.out else None
    predictor = load(
        bundle,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        cache_dir=args.cache_dir,
    )
    err_console.print(
        f"madclip-infer: backend {predictor.backend_name} (provider {predictor.provider}), precision "
        f"{predictor.precision}, threshold {predictor.threshold} on {predictor.score_name}; study "
        f"{args.study}: {len(series)} series from {args.dicomweb}; {INTENDED_USE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    images = image_sop_classes()
    rows: list[dict[str, Any]] = []
    failed = 0
    used: set[str] = set()
    with predictor:
        for uid, modality, number in series:
            tmp = tempfile.mkdtemp(prefix="madclip-dicomweb-")
            try:
                files = []
                try:
                    for i, ds in enumerate(client.iter_series(args.study, uid)):
                        if str(ds.get("SOPClassUID", "")) not in images:
                            break
                        path = os.path.join(tmp, f"{i:05d}.dcm")
                        ds.save_as(path, enforce_file_format=True)
                        files.append(path)
                except requests.RequestException as exc:
                    raise _http_error(args.dicomweb, exc) from None
                if not files:
                    log.info("series %s (%s): not an image series: skipped", uid, modality or "?")
                    continue
                stem = f"series{number}" if number else f"series_{uid[-8:]}"
                base, k = stem, 2
                while stem in used:
                    stem, k = f"{base}_{k}", k + 1
                used.add(stem)
                volume = read_series(files, bundle.spec.window, name=stem)
                result = score_series(
                    volume,
                    predictor,
                    bundle,
                    args.volume_score,
                    args.map_threshold,
                    objects=args.stow or args.dicom_seg,
                )
                record = dict(result.record, file=f"{args.dicomweb} series {uid}")
                if out_dir is not None:
                    map_t, how = infer.map_threshold_choice(args, bundle)
                    paths = save_volume_outputs(
                        out_dir,
                        stem,
                        volume,
                        result.preds,
                        record,
                        bundle.map_scale,
                        map_t,
                        how,
                        (lambda arr, seg=result.seg: seg) if args.dicom_seg and result.seg else None,
                    )
                    record["outputs"] = {k: os.path.basename(v) for k, v in paths.items()}
                if args.stow:
                    record["stored"] = _stow(client, args.dicomweb, args.study, result)
                    err_console.print(
                        f"series {uid}: {' + '.join(record['stored'])} stored with STOW-RS",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
            except (InputError, MadclipError) as exc:
                error_line(
                    f"series {uid}: {str(exc).replace(tmp + os.sep, '').replace(tmp, 'retrieved series')}"
                )
                failed += 1
                continue
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if args.json:
                print(json.dumps(jsonable(record), allow_nan=False), flush=True)
            rows.append(record)
    if rows and not args.json:
        infer_console = infer.Console(soft_wrap=True)
        infer_console.print(_volume_table(rows))
    return EXIT_FAILED if failed else EXIT_OK


def _stow(client: Any, url: str, study: str, result: Any) -> list[str]:
    """STOW-RS the SR (and SEG); MadclipError naming what the PACS refused."""
    import io

    import pydicom

    objects = [("SEG", result.seg)] if result.seg is not None else []
    objects.append(("SR", result.sr))
    datasets = [pydicom.dcmread(io.BytesIO(data)) for _, data in objects]
    try:
        answer = client.store_instances(datasets=datasets, study_instance_uid=study)
    except Exception as exc:  # noqa: BLE001
        raise _http_error(url, exc) from None
    refused = answer.get("FailedSOPSequence") if answer is not None else None
    if refused:
        raise MadclipError(f"{url}: STOW-RS refused {len(refused)} of {len(datasets)} result object(s)")
    return [name for name, _ in objects]
