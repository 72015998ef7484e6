"""The Ray Serve deployment: HTTP in, the runtime predictor with dynamic request batching, JSON out.

Routes (raw Starlette requests, so no web framework beyond what Ray Serve ships):

    POST /predict[?name=scan.png&slice=N&map=png16|npy&threshold=T]   body: the encoded scan bytes
    GET  /metadata     method, bundle checksum, threshold, intended use, ...
    GET  /healthz      200 while this replica is healthy (liveness)
    GET  /ready        200 once the bundle is verified and warmed up (readiness)

A replica only exists once its constructor returned, and the constructor is `replica.open_verified`
(sha256 of the model, golden inputs within tolerance, a warm-up at the largest batch): Serve routes nothing to
a replica still starting and never starts one whose bundle is bad. Bad input (empty, oversized, undecodable,
a decompression bomb, a client that hangs up mid-body) fails that request only, with a 4xx and one line.
An inference failure of the backend itself marks the replica unhealthy, so Serve replaces it.

Slow clients (`limits.UploadGate`): bounded concurrent uploads, a body read timeout and a minimum upload
rate, with upload slots reserved on top of --max-ongoing. Wire parameters are validated by the same code as
the CLI and the API (`replica.wire_options`). Shutdown (`drain`): once madclip-serve sets the drain flag in
Ray's key-value store, every new request gets 503 while the requests in flight finish; the driver waits for
them (each replica reports its in-flight count) before stopping Ray, so no request ever sees a 404.

Batching: single-slice requests queue in `@serve.batch`; up to `max_batch_size` of them (the bundle's max
batch) run as one backend call, waiting at most `batch_wait_timeout_s` for the batch to fill. Both come
from the deployment's user_config and can change without a restart (`reconfigure`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve
from ray.serve import metrics
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import BundleError, InputError, MadclipError
from ..scans.imageio import ScanImage, one_line
from .decode import decode_scan_bytes
from .limits import RequestError, UploadGate, upload_slots
from .replica import ServeConfig, open_verified, record_json, wire_options, with_threshold

log = logging.getLogger("ray.serve")

STATUS_CLIENT_CLOSED = 499  # nginx's code for "client closed request": logged, never delivered


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


DRAIN_POLL_S = 0.2


def drain_key(app_name: str) -> bytes:
    """The key-value entry telling the replicas of `app_name` to drain (set by madclip-serve on SIGTERM)."""
    return f"madclip:{app_name}:draining".encode()


def inflight_prefix(app_name: str) -> bytes:
    """Each draining replica reports its requests in flight under `<prefix><replica id>`."""
    return f"madclip:{app_name}:inflight:".encode()


def _replica_id() -> str:
    try:
        rid = serve.get_replica_context().replica_id
        return str(getattr(rid, "unique_id", rid))
    except Exception:  # outside a replica (unit use): any unique name will do
        import uuid

        return uuid.uuid4().hex


@serve.deployment(
    name="madclip",
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
    graceful_shutdown_timeout_s=30,
)
class MadclipServer:
    """One replica: a verified, warmed-up Predictor behind the routes in the module docstring."""

    def __init__(self, cfg: ServeConfig, app_name: str = "madclip"):
        self.cfg = cfg
        self.predictor, self.meta = open_verified(cfg)  # raises: a bad bundle never serves
        self.failure: str | None = None
        self.stats = {"requests": 0, "model_calls": 0, "scans": 0, "largest_batch": 0}  # this replica's
        self.uploads = UploadGate(cfg.max_uploads, cfg.body_timeout_s, cfg.min_upload_rate)
        self.inflight = 0
        self.draining = False
        self._drain_key = drain_key(app_name)
        self._inflight_key = inflight_prefix(app_name) + _replica_id().encode()
        threading.Thread(target=self._watch_drain, name="madclip-drain", daemon=True).start()
        self.requests = metrics.Counter(
            "madclip_requests", "madclip /predict requests by outcome", tag_keys=("outcome",)
        )
        log.info("madclip replica ready: %s on %s %s", cfg.bundle, self.predictor.backend_name, cfg.precision)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size and wait from the deployment's user_config (updatable without restarting replicas)."""
        size = int(user_config.get("max_batch_size") or self.predictor.max_batch)
        self.infer.set_max_batch_size(max(1, min(size, self.predictor.max_batch)))
        self.infer.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.005)))

    def _watch_drain(self) -> None:
        """Poll the drain flag; once draining, report the requests in flight until the process ends."""
        from ray.experimental import internal_kv

        while True:
            try:
                if internal_kv._internal_kv_initialized():
                    if not self.draining and internal_kv._internal_kv_get(self._drain_key):
                        self.draining = True
                        log.info("madclip replica draining: new requests get 503")
                    if self.draining:
                        internal_kv._internal_kv_put(self._inflight_key, str(self.inflight).encode())
            except Exception as exc:  # the store is gone: Ray is stopping
                log.debug("drain watch: %s", exc)
            time.sleep(DRAIN_POLL_S)

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and gets it replaced."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def infer(self, items: list[tuple[ScanImage, float]]) -> list[Any]:
        """Up to max_batch_size queued (scan, decode ms) -> one backend call (in a thread: the loop keeps accepting)."""
        self.stats["model_calls"] += 1
        self.stats["scans"] += len(items)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(items))
        try:
            return await asyncio.to_thread(
                self.predictor.predict_scans, [s for s, _ in items], [ms for _, ms in items]
            )
        except BundleError as exc:  # the backend itself failed: this replica should be replaced
            self.failure = str(exc)
            raise

    async def _predict(self, request: Request) -> JSONResponse:
        try:
            opts = wire_options(request.query_params, self.predictor.bundle)
        except InputError as exc:
            raise RequestError(400, str(exc)) from None
        name, slice_index, fmt, threshold = opts.name, opts.slice_index, opts.map_format, opts.threshold
        body = await self.uploads.read(
            request.stream(), self.cfg.max_body_bytes, request.headers.get("content-length")
        )
        window = self.predictor.bundle.spec.window
        t0 = time.perf_counter()
        scans = await asyncio.to_thread(
            decode_scan_bytes, body, name, slice_index, window, self.cfg.max_body_bytes
        )
        decode_ms = (time.perf_counter() - t0) * 1e3 / len(scans)
        preds = await asyncio.gather(*(self.infer((s, decode_ms)) for s in scans))
        records = [record_json(with_threshold(p, threshold), self.predictor, fmt) for p in preds]
        if len(records) == 1:
            return JSONResponse(records[0])
        return JSONResponse({"file": name, "slices": records})

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        if self.draining:  # shutting down: never a 404 from a half-removed route, a clear 503 instead
            return _error(
                503, "madclip-serve is shutting down; retry on another replica", {"Retry-After": "5"}
            )
        if path == "/predict":
            if method != "POST":
                return _error(405, "use POST /predict with the scan bytes as the body")
            return await self._predict_guarded(request)
        if method != "GET":
            return _error(405, f"{path} answers GET only")
        if path == "/metadata":
            return JSONResponse(self.meta)
        if path in ("/healthz", "/ready"):
            if self.failure is not None:
                return _error(503, self.failure)
            return JSONResponse(
                {
                    "status": "ok",
                    "ready": True,
                    "bundle_sha256": self.meta["bundle_sha256"],
                    "signed_by": self.meta["signed_by"],
                    "trusted_key_id": self.meta["trusted_key_id"],
                    "replica_stats": dict(self.stats),
                    "upload_stats": dict(self.uploads.stats),
                }
            )
        return _error(404, f"no route {path}; use POST /predict, GET /metadata, /healthz, /ready")

    async def _predict_guarded(self, request: Request) -> Response:
        """/predict with every per-request failure turned into that request's error response."""
        self.stats["requests"] += 1
        self.inflight += 1
        try:
            response = await self._predict(request)
            outcome = "ok"
        except RequestError as exc:
            response, outcome = _error(exc.status, str(exc), exc.headers), f"http_{exc.status}"
        except InputError as exc:
            response, outcome = _error(400, str(exc)), "bad_input"
        except ClientDisconnect:
            log.warning("client disconnected before sending the whole body")
            response, outcome = Response(status_code=STATUS_CLIENT_CLOSED), "client_disconnect"
        except MadclipError as exc:
            response, outcome = _error(500, str(exc)), "error"
        except Exception as exc:  # never let one request take the replica down
            log.exception("predict failed")
            response, outcome = _error(500, f"{type(exc).__name__}: {one_line(exc)}"), "error"
        finally:
            self.inflight -= 1
        self.requests.inc(tags={"outcome": outcome})
        return response


def build_app(
    cfg: ServeConfig,
    replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_batch_size: int | None = None,
    batch_wait_s: float = 0.005,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 64,
    graceful_shutdown_timeout_s: float = 30.0,
    constructor_retries: int = 2,
    app_name: str = "madclip",
) -> Any:
    """The bound Serve application for `serve.run` (replicas, or autoscaling between min and max).

    Each replica accepts `max_ongoing_requests` requests being scored plus the slots of bodies still arriving
    (`limits.upload_slots`, `limits.UploadGate`): slow uploads never take the slots of requests being scored.

    `constructor_retries` is small on purpose: a replica that cannot verify its bundle will not do better on
    the 20th try (Serve's default), and the deployment should fail promptly with the reason.
    """
    options: dict[str, Any] = {
        "max_constructor_retry_count": constructor_retries,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "user_config": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_s},
        "max_ongoing_requests": int(max_ongoing_requests) + upload_slots(cfg.max_uploads),
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas
    return MadclipServer.options(**options).bind(cfg, app_name)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for config files (`serve run`, `serve deploy`, KubeRay's serveConfigV2):

        import_path: madclip_runtime.serve.app:app_builder
        args: {bundle: /bundles/brain16, backend: ort-cpu, precision: fp32, max_body_mb: 64,
               trusted_key: /keys/lab.pub, max_uploads: 16, body_timeout: 10, min_upload_rate: 4096}

    Every value is validated as madclip-serve validates its options (`options.serve_config_from`).

    Replicas, resources, autoscaling and the batch size/wait (user_config) are set in the config's
    `deployments:` entry for the deployment named "madclip", as for any Serve deployment.
    """
    if not args.get("bundle"):
        raise MadclipError("app_builder needs args.bundle (the bundle directory on the Ray nodes)")
    from .options import serve_config_from

    cfg = serve_config_from({k.replace("-", "_"): v for k, v in args.items()})
    return MadclipServer.options(
        user_config={"max_batch_size": None, "batch_wait_timeout_s": 0.005},
        max_ongoing_requests=64 + upload_slots(cfg.max_uploads),
    ).bind(cfg)
