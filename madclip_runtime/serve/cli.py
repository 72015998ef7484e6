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
from ..cli.common import EXIT_OK, Terminated, err_console, run_cli, setup_logging
from ..cli.infer import BACKEND_CHOICES, PRECISION_CHOICES
from ..errors import MadclipError
from . import require_ray
from .decode import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger(__name__)

APP_NAME = "madclip"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="madclip-serve",
                                description=f"Serve a madclip bundle over HTTP with Ray Serve ({INTENDED_USE}).")
    p.add_argument("--bundle", required=True, help="bundle directory (must be readable on every Ray node)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help="inference backend per replica")
    p.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES)
    p.add_argument("--threshold", type=float, default=None, help="decision threshold overriding the bundle's")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="number of replicas (ignored with --autoscale)")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas on ongoing requests per replica")
    p.add_argument("--target-ongoing", type=float, default=8.0,
                   help="autoscaling target of ongoing requests per replica (default 8)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions allowed)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest request batch per model call (default and ceiling: the bundle's max batch)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a partial batch waits for more requests (default 5 ms)")
    p.add_argument("--no-batching", action="store_true", help="one model call per request")
    p.add_argument("--max-ongoing", type=int, default=64, help="concurrent requests per replica (default 64)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                   help="largest accepted request body in MiB (default 64)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds a stopping replica waits for in-flight requests (default 30)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache on the replicas")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"madclip {__version__}")
    return p


def parse_autoscale(text: str | None, target: float) -> dict[str, Any] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m or int(m.group(1)) > int(m.group(2)) or int(m.group(2)) < 1:
        raise MadclipError(f"--autoscale must be MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return {"min_replicas": int(m.group(1)), "max_replicas": int(m.group(2)),
            "target_ongoing_requests": float(target)}


def deployment_error(exc: BaseException) -> str:
    """The one useful line of a failed deployment (our MadclipError text when a replica raised one)."""
    text = str(exc)
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


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from ..bundles.bundle import load_bundle
    from .replica import ServeConfig

    if not 0 < args.port < 65536:
        raise MadclipError(f"--port must be 1..65535, got {args.port}")
    if args.replicas < 1 or args.num_cpus < 0 or args.num_gpus < 0 or args.max_body_mb <= 0:
        raise MadclipError("--replicas must be >= 1, --num-cpus/--num-gpus >= 0 and --max-body-mb > 0")
    autoscaling = parse_autoscale(args.autoscale, args.target_ongoing)
    bundle = load_bundle(args.bundle, verify="none")  # fast one-line check here; replicas verify sha256
    cfg = ServeConfig(bundle=bundle.path, backend=args.backend, precision=args.precision, threshold=args.threshold,
                      max_body_bytes=int(args.max_body_mb * 2**20), cache_dir=args.cache_dir)
    serve = require_ray("serve")
    from .app import build_app

    ray = start_ray(args.address, args.ray_num_cpus)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(cfg, replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                        max_batch_size=1 if args.no_batching else args.max_batch,
                        batch_wait_s=0.0 if args.no_batching else args.batch_wait_ms / 1e3,
                        autoscaling=autoscaling, max_ongoing_requests=args.max_ongoing,
                        graceful_shutdown_timeout_s=args.graceful_timeout)
        try:
            try:
                serve.run(app, name=APP_NAME, route_prefix="/")
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                reason = app_failure(APP_NAME, exc)
                serve.delete(APP_NAME, _blocking=True)  # leave no failed application behind on a cluster
                raise MadclipError(f"deployment failed: {reason}") from None
            err_console.print(f"madclip-serve: {bundle.path} ready on http://{args.host}:{args.port} "
                              f"(POST /predict, GET /metadata, /healthz, /ready); {INTENDED_USE}",
                              markup=False, highlight=False, soft_wrap=True)
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (Terminated), also while serve.run was still waiting
            err_console.print("madclip-serve: stopping, finishing in-flight requests ...",
                              markup=False, highlight=False)
            serve.delete(APP_NAME, _blocking=True)  # replicas drain; the proxy still delivers their answers
            err_console.print("madclip-serve: stopped", markup=False, highlight=False)
        return EXIT_OK
    finally:
        try:
            if not args.address:  # our own local Ray: stop Serve; on a shared cluster leave other apps alone
                serve.shutdown()
        finally:
            ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (madclip-serve)."""
    return run_cli(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
