"""madclip-serve: a bundle behind an HTTP endpoint on Ray Serve (local Ray, or a cluster with --address).

    madclip-serve --bundle bundles/brain16 --port 8000 --replicas 2
    curl -X POST --data-binary @scan.png localhost:8000/predict

Blocks until Ctrl-C or SIGTERM, then stops gracefully: the application is deleted first, which lets every
replica finish its in-flight requests (up to --graceful-timeout seconds) while the HTTP proxy still
delivers their responses, and only then Serve and Ray are shut down. Exit 2 with one line when the bundle
is bad (no replica ever serves it) or Ray is missing. Research use, not for clinical decisions.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import time
from typing import Any, Sequence

from .. import INTENDED_USE, __version__, logs
from ..cli.common import EXIT_OK, ArgumentParser, Terminated, err_console, run_cli, setup_logging
from ..cli.infer import BACKEND_CHOICES, PRECISION_CHOICES
from ..contract import FP32
from ..errors import MadclipError
from . import require_ray
from .decode import DEFAULT_MAX_BODY_BYTES
from .limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_UPLOADS, DEFAULT_MIN_UPLOAD_RATE
from .options import DEFAULT_KEEP_ALIVE_S, VALIDATORS, read_trusted_key

log = logging.getLogger(__name__)

APP_NAME = "madclip"
ANSI_CODES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def build_parser() -> argparse.ArgumentParser:
    v = VALIDATORS
    p = ArgumentParser(
        prog="madclip-serve", description=f"Serve a madclip bundle over HTTP with Ray Serve ({INTENDED_USE})."
    )
    p.add_argument("--bundle", required=True, help="bundle directory (must be readable on every Ray node)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="inference backend per replica")
    p.add_argument("--precision", default=FP32, choices=PRECISION_CHOICES)
    p.add_argument(
        "--threshold",
        type=v["threshold"],
        default=None,
        help="decision threshold overriding the bundle's (within its score range)",
    )
    p.add_argument(
        "--trusted-key",
        default=None,
        metavar="PUB",
        help="Ed25519 public key (PEM): refuse a bundle not signed by it (checked here and by "
        "every replica; clients verify it with madclip-infer --server URL --trusted-key PUB)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=v["port"], default=8000)
    p.add_argument(
        "--replicas", type=v["replicas"], default=1, help="number of replicas (ignored with --autoscale)"
    )
    p.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN:MAX",
        help="autoscale between MIN and MAX replicas on ongoing requests per replica",
    )
    p.add_argument(
        "--target-ongoing",
        type=v["target_ongoing"],
        default=8.0,
        help="autoscaling target of ongoing requests per replica (default 8)",
    )
    p.add_argument(
        "--num-cpus", type=v["num_cpus"], default=1.0, help="CPUs reserved per replica (default 1)"
    )
    p.add_argument("--num-gpus", type=v["num_gpus"], default=0.0, help="GPUs per replica (fractions allowed)")
    p.add_argument(
        "--max-batch",
        type=v["max_batch"],
        default=None,
        help="largest request batch per model call (default and ceiling: the bundle's max batch)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=v["batch_wait_ms"],
        default=5.0,
        help="how long a partial batch waits for more requests (default 5 ms)",
    )
    p.add_argument("--no-batching", action="store_true", help="one model call per request")
    p.add_argument(
        "--max-ongoing",
        type=v["max_ongoing"],
        default=64,
        help="requests being scored at once per replica (default 64; uploads have own slots)",
    )
    p.add_argument(
        "--max-body-mb",
        type=v["max_body_mb"],
        default=DEFAULT_MAX_BODY_BYTES / 2**20,
        help="largest accepted request body in MiB (default 64)",
    )
    p.add_argument(
        "--max-uploads",
        type=v["max_uploads"],
        default=DEFAULT_MAX_UPLOADS,
        help=f"request bodies received at once per replica (default {DEFAULT_MAX_UPLOADS})",
    )
    p.add_argument(
        "--body-timeout",
        type=v["body_timeout"],
        default=DEFAULT_BODY_TIMEOUT_S,
        help=f"seconds to wait for the next chunk of a request body (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--min-upload-rate",
        type=v["min_upload_rate"],
        default=DEFAULT_MIN_UPLOAD_RATE,
        help=f"bytes/s a request body must average after its first second (default "
        f"{DEFAULT_MIN_UPLOAD_RATE:g})",
    )
    p.add_argument(
        "--keep-alive",
        type=v["keep_alive"],
        default=DEFAULT_KEEP_ALIVE_S,
        help=f"seconds an idle keep-alive connection stays open (default {DEFAULT_KEEP_ALIVE_S:g})",
    )
    p.add_argument(
        "--graceful-timeout",
        type=v["graceful_timeout"],
        default=30.0,
        help="seconds a stopping server waits for in-flight requests (default 30)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray",
    )
    p.add_argument(
        "--ray-num-cpus", type=v["ray_num_cpus"], default=None, help="CPUs of the local Ray (default: all)"
    )
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache on the replicas")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def check_port_free(host: str, port: int) -> None:
    """One line, before Ray starts, when another process already listens on host:port."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MadclipError(f"--host {host}: cannot resolve ({exc.strerror or exc})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise MadclipError(
                f"port {port} on {host} is not available ({exc.strerror or exc}): "
                "another server listens there; choose another --port"
            ) from None


def parse_autoscale(text: str | None, target: float) -> dict[str, Any] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) < 1:
        raise MadclipError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return {
        "min_replicas": int(m.group(1)),
        "max_replicas": int(m.group(2)),
        "target_ongoing_requests": float(target),
    }


def deployment_error(exc: BaseException) -> str:
    """The one useful line of a failed deployment (our MadclipError text when a replica raised one), without
    the terminal colour codes Ray puts into its exception texts."""
    text = ANSI_CODES.sub("", str(exc))
    m = re.findall(r"(?:BundleError|InputError|BackendUnavailable|MadclipError): (.+)", text)
    if m:
        return m[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def app_failure(app_name: str, exc: BaseException) -> str:
    """Why `serve.run` failed: the replicas' own error (from serve.status) rather than Serve's summary line."""
    texts = []
    try:
        from ray import serve

        status = serve.status().applications.get(app_name)
        if status is not None:
            texts = [d.message for d in status.deployments.values() if d.message] + [status.message or ""]
    except Exception as status_exc:  # the status query is best effort; the summary line remains
        log.debug("serve.status failed: %s", status_exc)
    return deployment_error(RuntimeError("\n".join([*texts, str(exc)])))


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def start_ray(address: str | None, num_cpus: int | None) -> Any:
    require_ray("serve")
    import ray

    logs.quiet_loaded()  # Ray set up its own loggers on import: quiet them before ray.init speaks
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus, **quiet)
    if not log.isEnabledFor(logging.DEBUG):
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices are not the user's business
    logs.quiet_loaded()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # ray.init installs sys.exit on SIGTERM; we drain first
    return ray


def drain(app_name: str, timeout_s: float) -> int:
    """Tell the replicas to answer 503 to every new request, then wait (at most `timeout_s`) until each
    running replica reports no request in flight. Returns the requests still in flight when it stopped
    waiting.
    """
    from ray import serve
    from ray.experimental import internal_kv

    from .app import DRAIN_POLL_S, drain_key, inflight_prefix

    internal_kv._internal_kv_put(drain_key(app_name), b"1")
    prefix = inflight_prefix(app_name)
    deadline = time.monotonic() + timeout_s
    remaining = -1
    while True:
        try:
            status = serve.status().applications.get(app_name)
            replicas = (
                sum(sum(d.replica_states.values()) for d in status.deployments.values()) if status else 0
            )
        except Exception:  # the controller is gone: nothing is served any more
            return 0
        counts = [int(internal_kv._internal_kv_get(k) or b"0") for k in internal_kv._internal_kv_list(prefix)]
        remaining = sum(counts)
        if len(counts) >= replicas and remaining == 0:
            return 0
        if time.monotonic() > deadline:
            return remaining
        time.sleep(DRAIN_POLL_S)


def _reset_drain(app_name: str) -> None:
    """Forget a previous run's drain state (a shared cluster's key-value store outlives us)."""
    from ray.experimental import internal_kv

    from .app import drain_key, inflight_prefix

    internal_kv._internal_kv_del(drain_key(app_name))
    internal_kv._internal_kv_del(inflight_prefix(app_name), del_by_prefix=True)


def _say(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)  # every numeric option validated here, before Ray
    setup_logging(args.verbose)
    from ..bundles.bundle import load_bundle
    from ..predictor import check_threshold
    from .replica import ServeConfig

    autoscaling = parse_autoscale(args.autoscale, args.target_ongoing)
    trusted_key = read_trusted_key(args.trusted_key)
    # one-line checks here; replicas verify sha256, signature and the golden set again
    bundle = load_bundle(
        args.bundle,
        verify="model" if trusted_key else "none",
        precision=args.precision,
        trusted_key=trusted_key,
    )
    check_threshold(args.threshold, bundle)
    if args.precision not in bundle.precisions:
        raise MadclipError(
            f"{bundle.path}: has no {args.precision} model (it has {', '.join(bundle.precisions)})"
        )
    check_port_free(args.host, args.port)
    cfg = ServeConfig(
        bundle=bundle.path,
        backend=args.backend,
        precision=args.precision,
        threshold=args.threshold,
        max_body_bytes=int(args.max_body_mb * 2**20),
        cache_dir=args.cache_dir,
        trusted_key=trusted_key,
        max_uploads=args.max_uploads,
        body_timeout_s=args.body_timeout,
        min_upload_rate=args.min_upload_rate,
    )
    serve = require_ray("serve")
    from .app import build_app

    ray = start_ray(args.address, args.ray_num_cpus)
    stopped_clean = False
    try:
        _reset_drain(APP_NAME)
        try:
            serve.start(
                http_options={"host": args.host, "port": args.port, "keep_alive_timeout_s": args.keep_alive}
            )
        except Exception as exc:
            raise MadclipError(
                f"cannot start the HTTP proxy on {args.host}:{args.port}: {deployment_error(exc)}"
            ) from None
        app = build_app(
            cfg,
            replicas=args.replicas,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            max_batch_size=1 if args.no_batching else args.max_batch,
            batch_wait_s=0.0 if args.no_batching else args.batch_wait_ms / 1e3,
            autoscaling=autoscaling,
            max_ongoing_requests=args.max_ongoing,
            graceful_shutdown_timeout_s=args.graceful_timeout,
            app_name=APP_NAME,
        )
        try:
            try:
                serve.run(app, name=APP_NAME, route_prefix="/")
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                reason = app_failure(APP_NAME, exc)
                serve.delete(APP_NAME, _blocking=True)  # leave no failed application behind on a cluster
                raise MadclipError(f"deployment failed: {reason}") from None
            signed = f"signed by {bundle.signed_by}" if bundle.signed_by else "unsigned"
            _say(
                f"madclip-serve: {bundle.path} ({signed}) ready on http://{args.host}:{args.port} "
                f"(POST /predict, GET /metadata, /healthz, /ready); {INTENDED_USE}"
            )
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated), also while serve.run was still waiting
            _say("madclip-serve: stopping: new requests get 503, finishing in-flight requests ...")
            left = drain(APP_NAME, args.graceful_timeout)
            if left:
                _say(
                    f"madclip-serve: {left} request(s) still in flight after --graceful-timeout "
                    f"{args.graceful_timeout:g} s"
                )
            if args.address:  # a shared cluster: remove our application only (its route goes with it)
                serve.delete(APP_NAME, _blocking=True)
            stopped_clean = True
            _say("madclip-serve: stopped")
        return EXIT_OK
    finally:
        try:
            if args.address:  # a shared cluster: leave Serve and other applications alone
                _reset_drain(APP_NAME)
            elif not stopped_clean:
                serve.shutdown()
            # our own local Ray after a drain: stopping Ray closes the proxy's port at once (connection
            # refused), where serve.shutdown would first remove the route and answer 404 meanwhile
        finally:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-serve)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
