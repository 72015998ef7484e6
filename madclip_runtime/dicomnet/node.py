"""madclip-dicom-node: receive images by C-STORE, score each series when it is complete, send results back.

    madclip-dicom-node --bundle B --ae-title MADCLIP --port 11112 \
        --send-to PACS@127.0.0.1:4242 --allow ORTHANC

Receiving (pynetdicom storage SCP, every storage SOP class accepted): an image instance is written to the
spool and fsync'ed, then acknowledged with Success; nothing is scored inside the association, so the sender
(Orthanc forwards a whole study in one association with a 10 s timeout, and one failure status fails the
whole forward) always gets a prompt answer. Objects that are not images (SEG, SR, RT, presentation states)
are acknowledged with Success, logged and not scored. An instance beyond --max-instances or --max-mb for its
series is refused with 0xA700 (out of resources) and logged.

Scoring: a series is complete when no instance arrived for --quiet seconds; it is then read and scored as a
volume exactly as `madclip-infer` does a series folder, and its DICOM SEG and TID 1500 SR go to the outbox.
A sender thread delivers outbox items by C-STORE to --send-to, retrying with exponential backoff until they
succeed. Series with fewer than --min-slices frames, or whose geometry is not one volume, are moved to
SPOOL/failed with one log line. See `madclip_runtime.dicomnet.spool` for the crash-safety argument.

Logs name series by SeriesInstanceUID and peers by AE title and address; patient names and IDs never reach
the log (pynetdicom's own logger stays at WARNING even with -v). Research use, not for clinical decisions.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from .. import INTENDED_USE, __version__
from ..cli.common import ArgumentParser, bounded_int, err_console, finite_float, run_cli, setup_logging
from ..errors import InputError, MadclipError
from .spool import Spool, series_key

log = logging.getLogger("madclip.dicom-node")

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
MAX_ASSOCIATIONS = 32  # concurrent incoming associations

# Image storage SOP classes that are scored (PS3.4 B.5): CT, MR, enhanced multi-frame, secondary capture,
# X-ray (CR, DX, mammography, XA, RF), PET. Every other storage class is acknowledged and not scored.
IMAGE_SOP_CLASS_NAMES = (
    "CTImageStorage",
    "EnhancedCTImageStorage",
    "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "XRayAngiographicImageStorage",
    "EnhancedXAImageStorage",
    "XRayRadiofluoroscopicImageStorage",
    "EnhancedXRFImageStorage",
    "PositronEmissionTomographyImageStorage",
    "EnhancedPETImageStorage",
    "LegacyConvertedEnhancedPETImageStorage",
)


def image_sop_classes() -> frozenset[str]:
    import pydicom.uid as U

    return frozenset(str(getattr(U, n)) for n in IMAGE_SOP_CLASS_NAMES if hasattr(U, n))


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name or uid


def _require_pacs() -> None:
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise MadclipError(
            'madclip-dicom-node needs pynetdicom; install it with: pip install "madclip[pacs]"'
        ) from None


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """'PACS@127.0.0.1:4242' -> Destination (MadclipError naming the option otherwise)."""
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if (
        not at
        or not colon
        or not ae.strip()
        or len(ae.strip()) > 16
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise MadclipError(f"--send-to must be AE@host:port (AE title of 1 to 16 characters), got {text!r}")
    return Destination(ae.strip(), host.strip("[]"), int(port))


@dataclass
class SeriesState:
    """What the node knows about a series being received (rebuilt from the spool after a restart)."""

    key: str
    uid: str
    n: int = 0
    nbytes: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    busy: bool = False
    over_limit: bool = False


@dataclass
class NodeOptions:
    spool: str
    ae_title: str = "MADCLIP"
    host: str = "0.0.0.0"
    port: int = 11112
    send_to: Destination | None = None
    allow: tuple[str, ...] | None = None  # None: any calling AE title
    quiet: float = 10.0
    max_instances: int = 2000
    max_bytes: int = 2048 << 20
    min_slices: int = 3
    retry_min: float = 2.0
    retry_max: float = 300.0
    volume_score: str = "max"
    map_threshold: float | None = None
    server_ssl: ssl.SSLContext | None = None
    send_ssl: ssl.SSLContext | None = None


class DicomNode:
    """The storage SCP, the scoring worker and the sender; `start()` then `stop()`."""

    def __init__(self, options: NodeOptions, predictor: Any, bundle: Any) -> None:
        _require_pacs()
        self.o = options
        self.predictor = predictor
        self.bundle = bundle
        self.spool = Spool(options.spool)
        self.images = image_sop_classes()
        self.series: dict[str, SeriesState] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.wake_sender = threading.Event()
        self.server: Any = None
        self.port: int | None = None
        self.assoc_counts: dict[int, int] = {}
        self.threads: list[threading.Thread] = []
        self.stats = {"received": 0, "not_scored": 0, "refused": 0, "scored": 0, "failed": 0, "sent": 0}

    # ------------------------------------------------------------------------------------------ receiving
    def _on_c_store(self, event: Any) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        peer = _peer(event.assoc)
        if sop_class not in self.images:
            log.info(
                "%s: %s %s is not an image: acknowledged, not scored", peer, _sop_name(sop_class), sop_uid
            )
            self.stats["not_scored"] += 1
            return SUCCESS
        try:
            uid = str(event.dataset.get("SeriesInstanceUID", "") or "")
            data = event.encoded_dataset()
        except Exception as exc:  # noqa: BLE001 - a malformed dataset must not break the association
            log.warning(
                "%s: instance %s could not be decoded (%s): refused", peer, sop_uid, type(exc).__name__
            )
            self.stats["refused"] += 1
            return CANNOT_UNDERSTAND
        if not uid:
            log.warning("%s: instance %s has no SeriesInstanceUID: refused", peer, sop_uid)
            self.stats["refused"] += 1
            return CANNOT_UNDERSTAND
        key = series_key(uid)
        with self.lock:
            st = self.series.get(key)
            if st is None:
                st = self.series[key] = SeriesState(key, uid)
                log.info("%s: receiving series %s", peer, uid)
            if st.n + 1 > self.o.max_instances or st.nbytes + len(data) > self.o.max_bytes:
                if not st.over_limit:
                    log.warning(
                        "series %s: over the limit of %d instances / %d MB per series: further instances "
                        "refused (0xA700); the series will not be scored",
                        uid,
                        self.o.max_instances,
                        self.o.max_bytes >> 20,
                    )
                st.over_limit = True
                self.stats["refused"] += 1
                return OUT_OF_RESOURCES
        try:
            _, new = self.spool.store_instance(key, sop_uid, data)
        except OSError as exc:
            log.error(
                "series %s: cannot write instance %s to the spool (%s): refused (0xA700)",
                uid,
                sop_uid,
                exc.strerror or exc,
            )
            self.stats["refused"] += 1
            return OUT_OF_RESOURCES
        with self.lock:
            if self.series.get(key) is not st:  # its previous batch finished scoring meanwhile: a new batch
                st = self.series.setdefault(key, SeriesState(key, uid))
                new = True
            st.last_seen = time.monotonic()
            if new:
                st.n += 1
                st.nbytes += len(data)
            self.assoc_counts[id(event.assoc)] = self.assoc_counts.get(id(event.assoc), 0) + 1
        self.stats["received"] += 1
        return SUCCESS

    def _on_requested(self, event: Any) -> None:
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()  # before pynetdicom's check
        if self.o.allow is not None and calling not in self.o.allow:
            log.warning(
                "%s@%s: association refused: calling AE title %r is not in --allow",
                calling,
                event.assoc.requestor.address,
                calling,
            )

    def _on_accepted(self, event: Any) -> None:
        log.debug("%s: association accepted", _peer(event.assoc))

    def _on_aborted(self, event: Any) -> None:
        log.debug("%s: A-ABORT", _peer(event.assoc))

    def _on_conn_close(self, event: Any) -> None:
        a = event.assoc
        n = self.assoc_counts.pop(id(a), None)
        if not a.is_established and n is None:
            return  # rejected or never negotiated: logged where it was refused
        if a.is_released:
            log.info("%s: association released after %d instance(s)", _peer(a), n or 0)
        else:
            log.warning(
                "%s: association aborted or dropped by the peer before release; the %d instance(s) "
                "acknowledged in it are kept (anything in transit was never acknowledged)",
                _peer(a),
                n or 0,
            )

    # ------------------------------------------------------------------------------------------ life cycle
    def start(self) -> int:
        """Recover the spool, start the SCP (non-blocking) and the worker threads. -> the bound port."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self._recover()
        ae = AE(ae_title=self.o.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.o.allow is not None:
            ae.require_calling_aet = list(self.o.allow)
        ae.dimse_timeout = ae.network_timeout = 60
        ae.maximum_associations = MAX_ASSOCIATIONS  # pynetdicom's default (10) rejects the 11th sender
        handlers = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        try:
            self.server = ae.start_server(
                (self.o.host, self.o.port), block=False, evt_handlers=handlers, ssl_context=self.o.server_ssl
            )
        except OSError as exc:
            raise MadclipError(
                f"cannot listen on {self.o.host}:{self.o.port} ({exc.strerror or exc})"
            ) from None
        self.port = int(self.server.server_address[1])
        for target, name in ((self._worker, "madclip-score"), (self._sender, "madclip-send")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)
        return self.port

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, let the current scoring finish (bounded), stop the sender.

        The spool keeps the rest."""
        self.stopping.set()
        self.wake_sender.set()
        if self.server is not None:
            self.server.shutdown()
        for t in self.threads:
            t.join(timeout)
        pending = len(self.spool.incoming_series())
        outbox = len(self.spool.outbox_items())
        log.info(
            "stopped: %d series waiting in the spool and %d result(s) in the outbox are resumed at the next "
            "start",
            pending,
            outbox,
        )

    def _recover(self) -> None:
        """Rebuild the series table from SPOOL/incoming; drop instances a committed result already used."""
        from ..scans.medical import read_dicom_header

        used = self.spool.used_instance_files()
        resumed = 0
        for key in self.spool.incoming_series():
            files = self.spool.incoming_files(key)
            done = [f for f in files if f in used and os.path.getmtime(f) <= used[f]]
            if done:
                self.spool.remove_incoming(done)
                log.info(
                    "spool: %d instance(s) of a series already scored before the restart removed", len(done)
                )
            files = [f for f in files if f not in done]
            if not files:
                self.spool.drop_empty(key)
                continue
            try:
                uid = str(read_dicom_header(files[0]).get("SeriesInstanceUID", "") or key)
            except InputError:
                uid = key
            self.series[key] = SeriesState(key, uid, len(files), sum(os.path.getsize(f) for f in files))
            resumed += 1
        if resumed or self.spool.outbox_items():
            log.info(
                "spool: resuming %d series received before the restart and %d result(s) in the outbox",
                resumed,
                len(self.spool.outbox_items()),
            )

    # ------------------------------------------------------------------------------------------ scoring
    def _due(self) -> SeriesState | None:
        now = time.monotonic()
        with self.lock:
            for st in self.series.values():
                if not st.busy and now - st.last_seen >= self.o.quiet:
                    st.busy = True
                    return st
        return None

    def _worker(self) -> None:
        while not self.stopping.is_set():
            st = self._due()
            if st is None:
                self.stopping.wait(0.1)
                continue
            try:
                self._process(st)
            except Exception as exc:  # noqa: BLE001 - one series never stops the node
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                log.error(
                    "series %s: unexpected %s while scoring: %s; instances kept in the spool for the next "
                    "start",
                    st.uid,
                    type(exc).__name__,
                    first,
                )
                with self.lock:
                    self.series.pop(st.key, None)

    def _finish(self, st: SeriesState, files: Sequence[str]) -> None:
        with self.lock:
            left = self.spool.incoming_files(st.key)
            if not left:
                self.spool.drop_empty(st.key)
                self.series.pop(st.key, None)
            else:  # instances arrived while scoring: a new batch once quiet again
                st.n, st.nbytes, st.busy, st.over_limit = (
                    len(left),
                    sum(os.path.getsize(f) for f in left),
                    False,
                    False,
                )
                log.warning(
                    "series %s: %d instance(s) arrived while it was scored; they are scored as another "
                    "batch when quiet",
                    st.uid,
                    len(left),
                )

    def _fail(self, st: SeriesState, files: Sequence[str], reason: str) -> None:
        folder = self.spool.move_failed(st.key, files, f"series {st.uid}: {reason}")
        self.stats["failed"] += 1
        log.error(
            "series %s: not scored: %s; its %d instance(s) are in %s", st.uid, reason, len(files), folder
        )
        self._finish(st, files)

    def _process(self, st: SeriesState) -> None:
        from ..scans.volume import group_series, read_dicom_series
        from .results import score_series

        files = self.spool.incoming_files(st.key)
        if st.over_limit:
            return self._fail(
                st,
                files,
                f"more than {self.o.max_instances} instances or {self.o.max_bytes >> 20} "
                "MB; instances beyond the limit were refused",
            )
        t0 = time.monotonic()
        groups, bad = group_series(files)
        if bad or len(groups) != 1:
            return self._fail(st, files, f"{len(bad)} unreadable instance(s)" if bad else "mixed series UIDs")
        frames = groups[0].frames
        if frames < self.o.min_slices:
            return self._fail(
                st,
                files,
                f"incomplete: {frames} frame(s) after {self.o.quiet:g} s without a new "
                f"instance, fewer than --min-slices {self.o.min_slices}",
            )
        try:
            volume = read_dicom_series(groups[0], self.bundle.spec.window)
        except InputError as exc:
            return self._fail(st, files, f"not one volume ({_strip_paths(str(exc), files)})")
        try:
            result = score_series(
                volume, self.predictor, self.bundle, self.o.volume_score, self.o.map_threshold
            )
        except InputError as exc:
            return self._fail(st, files, f"no result objects ({_strip_paths(str(exc), files)})")
        objects = {"sr.dcm": result.sr}
        if result.seg is not None:
            objects["seg.dcm"] = result.seg
        rec = result.record
        doc = {
            "series_uid": st.uid,
            "instance_files": list(files),
            "volume_score": rec["volume_score"],
            "label": rec["label"],
            "threshold": rec["threshold"],
            "n_slices": rec["n_slices"],
            "last_instance_age_s": round(time.monotonic() - st.last_seen, 3),
            "committed_at": time.time(),
            "identity": rec["bundle_identity"],
            "intended_use": INTENDED_USE,
        }
        self.spool.commit_result(st.key, objects, doc)
        self.spool.remove_incoming(files)
        self.stats["scored"] += 1
        label = rec["label"] or "no threshold"
        score = f"{rec['volume_score']:.4f}" if rec["volume_score"] is not None else "nan"
        log.info(
            "series %s: %d slices scored in %.1f s: %s %s (threshold %s); %s queued for %s",
            st.uid,
            rec["n_slices"],
            time.monotonic() - t0,
            score,
            label,
            rec["threshold"],
            " + ".join(sorted(o.split(".")[0].upper() for o in objects)),
            self.o.send_to,
        )
        self._finish(st, files)
        self.wake_sender.set()
        return None

    # ------------------------------------------------------------------------------------------ sending
    def _sender(self) -> None:
        while not self.stopping.is_set():
            now = time.time()
            next_due = now + 1.0
            for item in self.spool.outbox_items():
                if self.stopping.is_set():
                    return
                state = self.spool.item_state(item)
                if state.get("next_try", 0.0) > now:
                    next_due = min(next_due, state["next_try"])
                    continue
                self._send_item(item, state)
            self.wake_sender.wait(max(0.05, min(1.0, next_due - time.time())))
            self.wake_sender.clear()

    def _send_item(self, item: str, state: dict[str, Any]) -> None:
        try:
            doc = self.spool.item_doc(item)
        except (OSError, ValueError) as exc:
            log.error("outbox item %s is unreadable (%s); left in place", item, exc)
            self.spool.set_item_state(item, {"attempts": 0, "next_try": time.time() + self.o.retry_max})
            return
        attempts = int(state.get("attempts", 0)) + 1
        error = send_files(self.spool.item_objects(item), self.o.send_to, self.o.ae_title, self.o.send_ssl)
        if error is None:
            doc.update(sent_to=str(self.o.send_to), attempts=attempts, sent_at=time.time())
            self.spool.mark_sent(item, doc)
            self.stats["sent"] += 1
            log.info(
                "series %s: results stored on %s (attempt %d)",
                doc.get("series_uid"),
                self.o.send_to,
                attempts,
            )
            return
        delay = min(self.o.retry_max, self.o.retry_min * 2 ** (attempts - 1))
        self.spool.set_item_state(
            item, {"attempts": attempts, "next_try": time.time() + delay, "error": error}
        )
        log.warning(
            "series %s: sending results to %s failed (%s); retry %d in %.1f s, kept in the outbox",
            doc.get("series_uid"),
            self.o.send_to,
            error,
            attempts,
            delay,
        )


def send_files(
    paths: Sequence[str], dest: Destination, calling_ae: str, ssl_context: ssl.SSLContext | None
) -> str | None:
    """C-STORE every file to `dest` in one association. -> None on success, else a one-line reason."""
    from pydicom import dcmread
    from pynetdicom import AE

    try:
        datasets = [dcmread(p) for p in paths]
    except Exception as exc:  # noqa: BLE001
        return f"cannot read the result files ({type(exc).__name__})"
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    tls = (ssl_context, dest.host) if ssl_context is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    except OSError as exc:
        return f"connection failed: {exc.strerror or exc}"
    if not assoc.is_established:
        return (
            "association rejected or no answer" if assoc.is_rejected else "no association (is it listening?)"
        )
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                return "no C-STORE response (connection lost or timed out)"
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                return f"C-STORE of {_sop_name(str(ds.SOPClassUID))} answered 0x{code:04X}"
        return None
    finally:
        if assoc.is_established:
            assoc.release()


def _peer(assoc: Any) -> str:
    try:
        r = assoc.requestor
        return f"{str(r.ae_title).strip()}@{r.address}"
    except Exception:  # noqa: BLE001
        return "peer"


def _strip_paths(message: str, files: Sequence[str]) -> str:
    """An InputError message without the spool's paths (the series UID already names the series)."""
    for f in sorted(files, key=len, reverse=True):
        message = message.replace(f, os.path.basename(f))
    folder = os.path.dirname(files[0]) if files else ""
    return message.replace(folder + os.sep, "").replace(folder, "series")


# ---------------------------------------------------------------------------------------------- TLS


def server_ssl_context(cert: str, key: str, ca: str | None) -> ssl.SSLContext:
    """TLS for the SCP: our certificate; with `ca`, callers must present a certificate signed by it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(ca)
    except (OSError, ssl.SSLError) as exc:
        raise MadclipError(f"{cert}: cannot load the TLS certificate/key ({exc})") from None
    return ctx


def client_ssl_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS for sending results: verify the destination against `ca` (and present our certificate if given)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    try:
        ctx.load_verify_locations(ca)
        if cert and key:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise MadclipError(f"{ca}: cannot load the TLS CA certificate ({exc})") from None
    return ctx


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="madclip-dicom-node",
        description=f"DICOM node: receive series by C-STORE, score them with a madclip bundle, send "
        f"DICOM SEG + SR back by C-STORE ({INTENDED_USE}).",
    )
    p.add_argument("--bundle", required=True, help="bundle directory written by madclip-export")
    p.add_argument("--send-to", required=True, metavar="AE@HOST:PORT", help="where results go (the PACS)")
    p.add_argument(
        "--allow",
        default=None,
        metavar="AE1,AE2",
        help="calling AE titles accepted (required unless --allow-any)",
    )
    p.add_argument(
        "--allow-any", action="store_true", help="accept any calling AE title (a closed network only)"
    )
    p.add_argument("--ae-title", default="MADCLIP", help="this node's AE title (default MADCLIP)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=11112, help="DICOM port (0: any free port)")
    p.add_argument(
        "--spool",
        default="madclip-spool",
        metavar="DIR",
        help="durable working directory: received instances, outbox, journal (default ./madclip-spool)",
    )
    p.add_argument(
        "--quiet",
        type=finite_float(0.0),
        default=10.0,
        metavar="S",
        help="a series is complete after S seconds without a new instance (default 10)",
    )
    p.add_argument(
        "--max-instances", type=bounded_int(1), default=2000, help="instances per series (default 2000)"
    )
    p.add_argument("--max-mb", type=bounded_int(1), default=2048, help="megabytes per series (default 2048)")
    p.add_argument(
        "--min-slices",
        type=bounded_int(1),
        default=3,
        help="series with fewer frames are not scored (incomplete; default 3)",
    )
    delay = finite_float(0.0, min_open=True)
    for flag, default, what in (
        ("--retry-min", 2.0, "first retry delay of a failed send, doubled per attempt"),
        ("--retry-max", 300.0, "longest retry delay"),
    ):
        p.add_argument(flag, type=delay, default=default, metavar="S", help=f"{what} (default {default:g})")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="offer DICOM TLS with this certificate")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-ca", default=None, metavar="PEM", help="require callers' certificates signed by this CA"
    )
    p.add_argument(
        "--send-tls-ca",
        default=None,
        metavar="PEM",
        help="send results over TLS, verifying the destination against this CA",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "ort-cpu", "ort-cuda", "ort-trt", "trt"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    p.add_argument("--threshold", type=finite_float(0.0), default=None, help="decision threshold override")
    p.add_argument(
        "--map-threshold",
        type=finite_float(0.0),
        default=None,
        help="anomaly-map threshold for the SEG (default: the bundle's calibrated one)",
    )
    p.add_argument("--volume-score", default="max", help="max (default), mean-top-k or mean-top-N")
    p.add_argument("--trusted-key", default=None, metavar="PUB", help="refuse bundles not signed by this key")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (still no patient identifiers)"
    )
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def options_from_args(args: argparse.Namespace) -> NodeOptions:
    """Validate the options (one line each) into NodeOptions."""
    from ..scans.volume_output import parse_volume_score

    parse_volume_score(args.volume_score)
    if args.allow_any and args.allow:
        raise MadclipError("give --allow or --allow-any, not both")
    if not args.allow_any and not args.allow:
        raise MadclipError("--allow AE1,AE2 is required (the calling AE titles accepted), or --allow-any")
    allow = None
    if args.allow:
        allow = tuple(a.strip() for a in args.allow.split(",") if a.strip())
        if not allow or any(len(a) > 16 for a in allow):
            raise MadclipError(f"--allow must list AE titles of 1 to 16 characters, got {args.allow!r}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MadclipError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise MadclipError("--tls-ca needs --tls-cert/--tls-key")
    if len(args.ae_title) > 16 or not args.ae_title.strip():
        raise MadclipError(f"--ae-title must be 1 to 16 characters, got {args.ae_title!r}")
    return NodeOptions(
        spool=args.spool,
        ae_title=args.ae_title.strip(),
        host=args.host,
        port=args.port,
        send_to=parse_destination(args.send_to),
        allow=allow,
        quiet=args.quiet,
        max_instances=args.max_instances,
        max_bytes=args.max_mb << 20,
        min_slices=args.min_slices,
        retry_min=args.retry_min,
        retry_max=max(args.retry_max, args.retry_min),
        volume_score=args.volume_score,
        map_threshold=args.map_threshold,
        server_ssl=server_ssl_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None,
        send_ssl=client_ssl_context(args.send_tls_ca) if args.send_tls_ca else None,
    )


def local_command(
    bundle: str | os.PathLike, send_port: int, spool: str | os.PathLike, quiet: float, *extra: str
) -> list[str]:
    """The command line of a node on 127.0.0.1 (any free port) accepting the AE title MODALITY, scoring on
    ORT CPU and sending to PACS@127.0.0.1:`send_port`: the one set-up of the tests and the benchmark that run
    the node as its own process (`extra`: more options)."""
    import sys

    return [
        sys.executable,
        "-m",
        "madclip_runtime.dicomnet.node",
        "--bundle",
        str(bundle),
        "--send-to",
        f"PACS@127.0.0.1:{send_port}",
        "--allow",
        "MODALITY",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--spool",
        str(spool),
        "--quiet",
        str(quiet),
        "--backend",
        "ort-cpu",
        *extra,
    ]


def quiet_library_loggers() -> None:
    """pynetdicom and pydicom log dataset contents at DEBUG, and pydicom's validation warnings quote element
    values (a malformed PatientName would be printed): keep the loggers at WARNING and those warnings off, so
    no identifier reaches the log."""
    import warnings

    for name in ("pynetdicom", "pydicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for module in (r"pydicom(\..*)?", r"highdicom(\..*)?", r"pynetdicom(\..*)?"):
        warnings.filterwarnings("ignore", module=module)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    quiet_library_loggers()
    _require_pacs()
    options = options_from_args(args)
    from ..bundles.bundle import load_bundle
    from ..predictor import load

    bundle = load_bundle(args.bundle, verify="model", precision=args.precision, trusted_key=args.trusted_key)
    predictor = load(bundle, backend=args.backend, precision=args.precision, threshold=args.threshold)
    node = DicomNode(options, predictor, bundle)
    port = node.start()
    err_console.print(
        f"madclip-dicom-node: {options.ae_title} listening on {options.host}:{port}"
        f"{' (TLS)' if options.server_ssl else ''}; results to {options.send_to}"
        f"{' (TLS)' if options.send_ssl else ''}; backend {predictor.backend_name} {predictor.precision}; "
        f"quiet {options.quiet:g} s; spool {node.spool.root}; {INTENDED_USE}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    with predictor:
        try:
            while True:
                time.sleep(0.5)
        except (
            KeyboardInterrupt
        ) as exc:  # SIGTERM (run_cli raises Terminated) or Ctrl-C: the normal way to stop
            log.info("stopping (%s)", "SIGTERM" if type(exc).__name__ == "Terminated" else "interrupted")
        finally:
            node.stop()  # the spool keeps what is not finished
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-dicom-node)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
