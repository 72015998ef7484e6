"""Inference backends for a bundle model: onnxruntime (CPU, CUDA, TensorRT providers) and native TensorRT.

Every backend takes float32 images [B, 3, H, W] and returns float32 `score` [B], `anomaly_map` [B, 1, H, W]
and `score_map_max` [B]. It reports the provider that ACTUALLY runs: onnxruntime-gpu silently falls back to
the CPU when CUDA or TensorRT cannot start (docs/ARCHITECTURE.md §4), which we turn into BackendUnavailable.

Names, fastest first: "trt" (native TensorRT engine), "ort-trt", "ort-cuda", "openvino" (x86 CPUs: fp32,
bf16, NNCF int8; `openvino_engine`), "ort-cpu".
onnxruntime, tensorrt and openvino are imported lazily; a missing one is a one-line BackendUnavailable.
"""

from __future__ import annotations

import abc
import contextlib
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import (
    BACKENDS,
    BF16,
    FP16,
    FP32,
    INPUT_NAME,
    INT8,
    OPENVINO,
    OPENVINO_PRECISIONS,
    OPENVINO_WEIGHTS_SUFFIX,
    ORT_CPU,
    ORT_CUDA,
    ORT_TRT,
    PRECISIONS,
    TRT,
)
from ..errors import BackendUnavailable, BundleError, InputError
from . import cuda_probe, openvino_engine, trt_engine, trt_rules

log = logging.getLogger(__name__)

PROVIDERS = {
    ORT_CPU: "CPUExecutionProvider",
    ORT_CUDA: "CUDAExecutionProvider",
    ORT_TRT: "TensorrtExecutionProvider",
}


def import_onnxruntime(gpu: bool = False) -> Any:
    """The onnxruntime module, or BackendUnavailable with the pip command that installs it."""
    try:
        import onnxruntime as ort  # noqa: PLC0415 (optional, heavy)
    except ImportError:
        extra = "gpu" if gpu else "cpu"
        raise BackendUnavailable(f'onnxruntime is not installed: pip install "madclip[{extra}]"') from None
    return ort


def _ort_version(ort: Any) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", str(ort.__version__))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def session_options(model_is_fp16: bool, on_cpu: bool) -> Any:
    """The one place onnxruntime SessionOptions are made.

    FP16 models NEVER get ORT_ENABLE_ALL: onnxruntime 1.31.1 segfaults (uncatchable) creating a CPU session
    for an FP16 model at that level (its NchwcTransformer). ORT_ENABLE_EXTENDED is used for FP16 models on
    every provider, because GPU sessions also place unsupported nodes on the CPU provider and the only thing
    ENABLE_ALL adds over EXTENDED is CPU layout transforms. Threads: intra_op_num_threads=0 is onnxruntime's
    default, one thread per physical core. `on_cpu=False` (CUDA / TensorRT sessions) turns off thread
    spinning, so the CPU does not busy-wait while the GPU works (power on a Jetson).
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_EXTENDED if model_is_fp16 else level.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 0
    if not on_cpu:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _visible_gpu() -> bool:
    """A CUDA GPU is visible (cuda-python, else the CUDA driver library; probed once per process)."""
    return cuda_probe.gpu_count() > 0


def _trt_usable() -> bool:
    """The native TensorRT backend can run: TensorRT >= 10, a GPU, and a working cuda-python (buffers)."""
    try:
        trt_engine.import_tensorrt()
    except BackendUnavailable:
        return False
    found = cuda_probe.cached_probe()
    return found.count > 0 and found.cudart_ok


def available_backends() -> list[str]:
    """Backends that can actually run here, fastest first (GPU ones only when a GPU is visible)."""
    found: list[str] = []
    if _trt_usable():
        found.append(TRT)
    try:
        providers = set(import_onnxruntime().get_available_providers())
    except BackendUnavailable:
        providers = set()
    gpu = bool(providers & {PROVIDERS[ORT_TRT], PROVIDERS[ORT_CUDA]}) and _visible_gpu()
    for name in (ORT_TRT, ORT_CUDA, ORT_CPU):
        if PROVIDERS[name] in providers and (name == ORT_CPU or gpu):
            found.append(name)
    if openvino_engine.installed():
        found.insert(found.index(ORT_CPU) if ORT_CPU in found else len(found), OPENVINO)
    return found


def resolve_auto(precision: str, has_openvino_int8: bool = False) -> str:
    """The fastest available backend for `precision` (trt > ort-trt > ort-cuda > ort-cpu).

    int8 is the CPU path (dynamic quantisation), so it resolves to ort-cpu. fp16 keeps its precision even
    when only the CPU is left, although FP16 on a CPU is slower than FP32 (docs/ARCHITECTURE.md §3): the bundle
    decides the precision, the backend does not silently change it. On the CPU, openvino replaces ort-cpu by
    `openvino_engine.prefer_for` (bf16 always, int8 with the bundle's OpenVINO INT8 IR; fp32 only without
    onnxruntime).
    """
    _check_precision(precision)
    found = available_backends()
    if not found:
        raise BackendUnavailable(
            'no inference backend available: pip install "madclip[cpu]" (or "madclip[gpu]")'
        )
    if precision == BF16:
        if OPENVINO not in found:
            raise BackendUnavailable(f'bf16 runs on the {OPENVINO} backend: pip install "madclip[openvino]"')
        return OPENVINO
    on_gpu = any(name not in (OPENVINO, ORT_CPU) for name in found)
    if OPENVINO in found and (precision == INT8 or not on_gpu):
        only_openvino = precision == FP32 and ORT_CPU not in found
        if openvino_engine.prefer_for(precision, has_openvino_int8) or only_openvino:
            return OPENVINO
    if precision == INT8:
        if ORT_CPU not in found:
            raise BackendUnavailable(
                "the int8 model needs onnxruntime's CPU provider, which is not available"
            )
        return ORT_CPU
    choice = next((name for name in BACKENDS if name in found and name != OPENVINO), None)
    if choice is None:
        raise BackendUnavailable(
            f'{precision} needs onnxruntime here: pip install "madclip[cpu]" (or "madclip[gpu]")'
        )
    if choice == ORT_CPU and precision == FP16:
        log.warning("no GPU backend available: running the fp16 model on the CPU (slower than fp32 there)")
    return choice


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def check_provider(backend: str, session_providers: list[str]) -> str:
    """The provider that actually runs; raise if the requested GPU provider fell back to another one."""
    wanted = PROVIDERS[backend]
    actual = session_providers[0] if session_providers else "none"
    if actual != wanted:
        raise BackendUnavailable(
            f"{backend}: onnxruntime fell back to {actual} instead of {wanted} (GPU, driver or libraries missing)"
        )
    return actual


def trt_ep_options(
    precision: str,
    cache_dir: str | os.PathLike,
    max_batch: int,
    input_chw: tuple[int, int, int] | None,
    ort_version: tuple[int, int],
) -> dict[str, Any]:
    """onnxruntime TensorRT provider options: engine and timing caches, and a batch 1..max_batch profile.

    FP16 uses the mixed-precision ONNX: with trt_fp16_enable off the provider builds a strongly typed network
    that keeps the file's FP32 islands (`trt_rules.ort_trt_precision_options` has the version boundary;
    below it the blanket FP16 flag is set, with LayerNorm kept in FP32).
    """
    opts: dict[str, Any] = {
        "device_id": 0,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": 2 << 30,
        **trt_rules.ort_trt_precision_options(precision, ort_version),
    }
    if input_chw is not None:
        shapes = trt_rules.profile_shapes(input_chw, max_batch)
        for key, shape in zip(("min", "opt", "max"), shapes):
            opts[f"trt_profile_{key}_shapes"] = f"{INPUT_NAME}:" + "x".join(str(d) for d in shape)
    return opts


def default_cache_dir() -> Path:
    """Where engines are cached by default: `trt_rules.engine_cache_dir()` ($MADCLIP_CACHE, else
    $XDG_CACHE_HOME/madclip, else ~/.cache/madclip; then engines/)."""
    return trt_rules.engine_cache_dir()


def _onnx_input_chw(model_path: Path) -> tuple[int, int, int] | None:
    """Static [3, H, W] of `image` read with the onnx package if it is installed (weights not loaded)."""
    try:
        import onnx  # noqa: PLC0415 (optional: not a runtime dependency)
    except ImportError:
        return None
    model = onnx.load(str(model_path), load_external_data=False)
    for inp in model.graph.input:
        if inp.name == INPUT_NAME:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
            return tuple(dims) if len(dims) == 3 and all(d > 0 for d in dims) else None
    return None


class Backend(abc.ABC):
    """A loaded model. `provider` is what actually runs; `load_seconds` is the cold start (incl. engine build)."""

    name: str
    precision: str
    provider: str
    load_seconds: float
    max_batch: int

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images float32 [B, 3, H, W] -> float32 outputs; batches larger than max_batch run in chunks."""
        images = _check_images(images)
        chunks = [
            self._run_batch(images[i : i + self.max_batch]) for i in range(0, len(images), self.max_batch)
        ]
        if len(chunks) == 1:
            return chunks[0]
        return {name: np.concatenate([c[name] for c in chunks], axis=0) for name in chunks[0]}

    @abc.abstractmethod
    def _run_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """One batch of at most max_batch images -> float32 outputs."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the session / engine; the backend cannot run afterwards."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.precision}, provider={self.provider})"


def _check_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        shape = list(images.shape) if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"backend input must be float32 images [B, 3, H, W] with B >= 1, got {shape}")
    if images.dtype != np.float32:
        if not np.issubdtype(images.dtype, np.floating):
            raise InputError(f"backend input must be float32 (preprocessed), got {images.dtype}")
        images = images.astype(np.float32)
    return np.ascontiguousarray(images)


class OrtBackend(Backend):
    """onnxruntime session on one provider (CPU, CUDA or TensorRT)."""

    def __init__(
        self, name: str, model_path: Path, precision: str, max_batch: int, session: Any, seconds: float
    ):
        self.name, self.precision, self.max_batch = name, precision, int(max_batch)
        self.session = session
        self.provider = check_provider(name, session.get_providers())
        self.load_seconds = seconds
        inputs = [i.name for i in session.get_inputs()]
        if inputs != [INPUT_NAME]:
            raise BundleError(f"{model_path}: model inputs {inputs}, expected ['{INPUT_NAME}']")
        self.output_names = [o.name for o in session.get_outputs()]

    def _run_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.session is None:
            raise BackendUnavailable(f"{self.name} backend is closed")
        values = self.session.run(self.output_names, {INPUT_NAME: images})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(self.output_names, values)}

    def close(self) -> None:
        self.session = None


class TrtBackend(Backend):
    """Native TensorRT engine built (or reused) on this machine."""

    def __init__(self, runner: trt_engine.TrtRunner, precision: str, seconds: float):
        self.name, self.precision, self.provider = TRT, precision, "TensorRT"
        self.runner, self.load_seconds = runner, seconds
        self.max_batch = runner.max_batch

    def _run_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.runner is None:
            raise BackendUnavailable("trt backend is closed")
        return self.runner.run(images)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None


def _model_is_fp16(model_path: Path, precision: str) -> bool:
    # Defensive: the FP16 segfault is uncatchable, so a file named like the FP16 variant counts too.
    return precision == FP16 or FP16 in model_path.name.lower()


def create_backend(
    name: str,
    model_path: str,
    precision: str,
    max_batch: int,
    cache_dir: str | None,
    onnx_sha256: str | None = None,
    input_chw: tuple[int, int, int] | None = None,
    fp32_islands: tuple[str, ...] | None = None,
) -> Backend:
    """Load `model_path` on backend `name` ("auto" resolves to the fastest available).

    `cache_dir` holds TensorRT engines and timing caches (default: `default_cache_dir()`); `onnx_sha256`
    (from the bundle metadata) saves hashing the model again; `input_chw` (from the bundle metadata) gives
    the onnxruntime TensorRT provider its static [3, H, W] profile dims; `fp32_islands` (the bundle metadata's)
    are the constants whose consumers start the FP32 tail of a TensorRT FP16-flag build (required there).
    """
    _check_precision(precision)
    if name == "auto":
        name = resolve_auto(precision)
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; expected auto or one of {', '.join(BACKENDS)}")
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    path = Path(model_path)
    if not path.is_file():
        raise BundleError(f"{path}: model file not found")
    start = time.perf_counter()
    if name == OPENVINO:
        return _create_openvino(path, precision, max_batch, cache_dir, onnx_sha256, start)
    if precision not in (FP32, FP16, INT8):
        raise BackendUnavailable(f"{name}: {precision} runs on the {OPENVINO} backend (--backend {OPENVINO})")
    if name == TRT:
        return _create_trt(
            path, precision, max_batch, cache_dir, onnx_sha256, start, tuple(fp32_islands or ())
        )
    return _create_ort(name, path, precision, max_batch, cache_dir, onnx_sha256, input_chw, start)


def open_session(ort: Any, path: Path, opts: Any, providers: list[Any], gpu: bool) -> Any:
    """An InferenceSession on exactly `providers`, never a silent fallback.

    onnxruntime's Python session retries a failing GPU provider on another one, printing an "EP Error ...
    Falling back" banner on stdout (which would corrupt `--json`), both when the session is created and
    inside `run()`. GPU sessions are created with enable_fallback=0 (so creation raises instead), with any
    stdout chatter sent to the log, and `disable_fallback()` is called so `run()` cannot switch providers
    behind our back while we report the first one.
    """
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            if gpu:
                session = ort.InferenceSession(
                    str(path), sess_options=opts, providers=providers, enable_fallback=0
                )
            else:
                session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, EPFail ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if gpu and ("EP" in first or "ExecutionProvider" in first or "Execution Provider" in first):
            raise BackendUnavailable(f"{path}: the GPU provider failed to start: {first}") from None
        raise BundleError(f"{path}: onnxruntime cannot load the model: {first}") from None
    finally:
        if chatter.getvalue().strip():
            log.warning("onnxruntime: %s", " ".join(chatter.getvalue().split()))
    if gpu:
        session.disable_fallback()
    return session


def _create_ort(
    name: str,
    path: Path,
    precision: str,
    max_batch: int,
    cache_dir: str | None,
    onnx_sha256: str | None,
    input_chw: tuple[int, int, int] | None,
    start: float,
) -> Backend:
    on_cpu = name == ORT_CPU
    ort = import_onnxruntime(gpu=not on_cpu)
    wanted = PROVIDERS[name]
    available = ort.get_available_providers()
    if wanted not in available:
        raise BackendUnavailable(
            f"{name}: this onnxruntime has no {wanted} (it has {', '.join(available)}); "
            'for GPUs: pip uninstall onnxruntime && pip install "madclip[gpu]"'
        )
    if not on_cpu and not _visible_gpu():
        raise BackendUnavailable(f"{name}: no CUDA GPU is visible on this machine")
    if name == ORT_TRT and precision == INT8:
        raise BackendUnavailable(
            "ort-trt: the int8 model is the CPU path (dynamic quantisation); use ort-cpu"
        )
    providers: list[Any]
    if name == ORT_CPU:
        providers = ["CPUExecutionProvider"]
    elif name == ORT_CUDA:
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    else:
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        ep_dir = trt_rules.ort_trt_cache_dir(root, onnx_sha256 or trt_rules.file_sha256(path))
        ep_dir.mkdir(parents=True, exist_ok=True)
        chw = input_chw or _onnx_input_chw(path)
        if chw is None:
            log.warning(
                "%s: input size unknown, the TensorRT provider will build per new batch shape", path.name
            )
        options = trt_ep_options(precision, ep_dir, max_batch, chw, _ort_version(ort))
        log.info("ort-trt: TensorRT engines cached in %s; a first build can take minutes on a Jetson", ep_dir)
        providers = [
            ("TensorrtExecutionProvider", options),
            ("CUDAExecutionProvider", {"device_id": 0}),
            "CPUExecutionProvider",
        ]
    opts = session_options(_model_is_fp16(path, precision), on_cpu=on_cpu)
    session = open_session(ort, path, opts, providers, gpu=not on_cpu)
    backend = OrtBackend(name, path, precision, max_batch, session, time.perf_counter() - start)
    log.info("%s: %s loaded on %s in %.2f s", name, path.name, backend.provider, backend.load_seconds)
    return backend


def require_trt() -> Any:
    """The tensorrt module when the native TensorRT backend can run here, else one-line BackendUnavailable."""
    trt = trt_engine.import_tensorrt()
    found = cuda_probe.cached_probe()
    if found.count == 0:
        raise BackendUnavailable("trt: no CUDA GPU is visible on this machine")
    if not found.cudart_ok:
        raise BackendUnavailable(
            f"trt: cuda-python cannot use the GPU ({found.error}); "
            "older drivers need cuda-python<13, JetPack 6.1/6.2 cuda-python 12.6.x (docs/gpu.md)"
        )
    return trt


def _trt_model(model_dir: Path, precision: str, trt_version: str) -> Path:
    """The ONNX file TensorRT builds `precision` from (`trt_rules.onnx_variant`)."""
    return model_dir / trt_rules.onnx_variant(precision, trt_version)


def prebuild_trt_engine(
    model_dir: str | os.PathLike,
    precision: str,
    max_batch: int,
    cache_dir: str | None = None,
    fp32_islands: tuple[str, ...] = (),
) -> tuple[Path, str]:
    """Build (or find) the engine `create_backend("trt", ...)` will look up for the model files in
    `model_dir`, in the same cache and under the same key; returns (engine path, TensorRT version)."""
    trt = require_trt()
    onnx_path = _trt_model(Path(model_dir), precision, trt.__version__)
    engine_dir = Path(cache_dir) if cache_dir else default_cache_dir() / TRT
    return (
        trt_engine.ensure_engine(
            onnx_path, engine_dir, precision, max_batch, fp32_islands=tuple(fp32_islands)
        ),
        trt.__version__,
    )


def _create_trt(
    path: Path,
    precision: str,
    max_batch: int,
    cache_dir: str | None,
    onnx_sha256: str | None,
    start: float,
    fp32_islands: tuple[str, ...] = (),
) -> Backend:
    trt_rules.check_trt_precision(precision)
    trt = require_trt()
    # TensorRT 10.0-10.11 builds FP16 from the FP32 graph with pinned islands: use model.onnx if it is beside.
    variant = _trt_model(path.parent, precision, trt.__version__)
    if variant != path and variant.is_file():
        log.info("trt: TensorRT %s builds %s from %s", trt.__version__, precision, variant.name)
        path, onnx_sha256 = variant, None
    # One cache dir for every model is safe: engine file names hash the model's content id (EngineKey).
    engine_dir = Path(cache_dir) if cache_dir else default_cache_dir() / TRT
    engine_path = trt_engine.ensure_engine(
        path, engine_dir, precision, max_batch, onnx_sha256, fp32_islands=fp32_islands
    )
    runner = trt_engine.TrtRunner(engine_path)
    backend = TrtBackend(runner, precision, time.perf_counter() - start)
    log.info("trt: %s loaded in %.2f s", engine_path.name, backend.load_seconds)
    return backend


class OpenVinoBackend(Backend):
    """An OpenVINO compiled model on the CPU (`openvino_engine`)."""

    def __init__(
        self,
        runner: openvino_engine.OpenVinoRunner,
        precision: str,
        max_batch: int,
        seconds: float,
        info: dict[str, Any],
    ):
        self.name, self.precision, self.max_batch = OPENVINO, precision, int(max_batch)
        # int8: the IR's quantized ops run INT8, the FP32 tail f32 (the inference precision hint)
        self.provider = f"OpenVINO CPU ({'int8 IR' if precision == INT8 else info['inference_precision']})"
        self.runner, self.load_seconds, self.info = runner, seconds, info

    def _run_batch(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if self.runner is None:
            raise BackendUnavailable(f"{OPENVINO} backend is closed")
        return self.runner.run(images)

    def close(self) -> None:
        self.runner = None


def _create_openvino(
    path: Path, precision: str, max_batch: int, cache_dir: str | None, model_id: str | None, start: float
) -> Backend:
    if precision not in OPENVINO_PRECISIONS:
        runs = ", ".join(OPENVINO_PRECISIONS)
        raise BackendUnavailable(f"{OPENVINO}: no {precision} path (it runs {runs}); fp16 is the GPU variant")
    if precision == INT8 and path.suffix != ".xml":
        raise BundleError(
            f"{path}: the {OPENVINO} int8 model is the NNCF IR (model_int8_ov.xml); re-export "
            f"with --int8 where openvino and nncf are installed"
        )
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if model_id is None:
        # an IR is .xml + .bin; for an ONNX graph file_sha256 adds its .data itself
        parts = [path, path.with_suffix(OPENVINO_WEIGHTS_SUFFIX)] if path.suffix == ".xml" else [path]
        model_id = trt_rules.content_id([trt_rules.file_sha256(p) for p in parts if p.is_file()])
    ov_dir = openvino_engine.cache_dir_for(root, model_id)
    runner, info = openvino_engine.compile_model(path, precision, ov_dir)
    backend = OpenVinoBackend(runner, precision, max_batch, time.perf_counter() - start, info)
    log.info(
        "%s: %s compiled (%s) in %.2f s, cache %s",
        OPENVINO,
        path.name,
        info["inference_precision"],
        backend.load_seconds,
        ov_dir,
    )
    return backend
