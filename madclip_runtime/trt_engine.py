"""TensorRT engines for a bundle model: build on the target, cache by key, run with execute_async_v3.

An engine only runs on the TensorRT version and GPU it was built for, so engines are built on the target
and cached under a name and a JSON sidecar (`EngineKey`) that record the TensorRT version, the GPU compute
capability, the precision, the ONNX sha256 and the batch profile; any mismatch rebuilds with a message.

FP16 (docs/ARCHITECTURE.md §3): TensorRT >= 10.12 (and 11, which has no FP16 builder flag) builds a strongly
typed network from the mixed-precision `model_fp16.onnx`, so its FP32 islands are honoured as written.
TensorRT 10.0-10.11 (JetPack 6 ships 10.3) parses the FP32 `model.onnx`, sets the FP16 builder flag and
pins the FP32 islands (`fp32_island`) with obeyed precision constraints.

`tensorrt` (and cuda-python for buffers) are imported lazily; their absence is a one-line
`BackendUnavailable`. Everything above the "needs tensorrt" line is pure and unit-tested without a GPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .contract import INPUT_NAME
from .errors import BackendUnavailable, BundleError, InputError

log = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp32", "fp16")
STRONGLY_TYPED_FROM = (10, 12)  # first TensorRT whose strongly typed FP16 path we use


# ----------------------------------------------------------------------------------------------------------
# Pure logic
# ----------------------------------------------------------------------------------------------------------


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """'10.3.0.30' -> (10, 3, 0); '10.12' -> (10, 12, 0). Extra components (build numbers) are dropped."""
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not match:
        raise BackendUnavailable(f"unrecognised TensorRT version string {version!r}")
    major, minor, patch = (int(g) if g is not None else 0 for g in match.groups())
    return major, minor, patch


def _as_version(version: str | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(version, str):
        return parse_trt_version(version)
    parts = tuple(int(v) for v in version) + (0, 0, 0)
    return parts[0], parts[1], parts[2]


def typing_mode(version: str | tuple[int, ...]) -> str:
    """How an FP16 engine is built with this TensorRT: "strongly_typed" (>= 10.12, 11+) or "fp16_flag" (10.0-10.11)."""
    v = _as_version(version)
    if v[0] < 10:
        raise BackendUnavailable(f"TensorRT >= 10 required (found {v[0]}.{v[1]}.{v[2]})")
    return "strongly_typed" if v[:2] >= STRONGLY_TYPED_FROM else "fp16_flag"


def onnx_variant(precision: str, version: str | tuple[int, ...]) -> str:
    """Which bundle ONNX file TensorRT should parse: the mixed-precision file only for strongly typed FP16.

    Under the FP16 flag TensorRT re-decides every layer's precision anyway, so it parses the FP32 graph and
    the FP32 islands are pinned by `fp32_island`; strongly typed builds take the types written in the file.
    """
    check_trt_precision(precision)
    if precision == "fp16" and typing_mode(version) == "strongly_typed":
        return "model_fp16.onnx"
    return "model.onnx"


def check_trt_precision(precision: str) -> None:
    if precision not in TRT_PRECISIONS:
        hint = " (the int8 model is the CPU path: use the ort-cpu backend)" if precision == "int8" else ""
        raise BackendUnavailable(f"TensorRT engines are built for fp32 or fp16, not {precision!r}{hint}")


def profile_shapes(
    input_shape_chw: tuple[int, int, int], max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of `image` for the optimisation profile: batch 1, 1 (latency) and max_batch."""
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    chw = tuple(int(d) for d in input_shape_chw)
    if len(chw) != 3 or any(d <= 0 for d in chw):
        raise BundleError(f"model input '{INPUT_NAME}' needs static [3, H, W] dims, got {list(input_shape_chw)}")
    return (1, *chw), (1, *chw), (int(max_batch), *chw)


def _sm(compute_capability: tuple[int, int]) -> str:
    major, minor = compute_capability
    return f"sm{int(major)}{int(minor)}"


def engine_file_name(precision: str, trt_version: str, sm: tuple[int, int]) -> str:
    """model_{precision}_trt{version}_sm{major}{minor}.engine, e.g. model_fp16_trt10.3.0_sm87.engine."""
    return f"model_{precision}_trt{trt_version}_{_sm(sm)}.engine"


def timing_cache_path(cache_dir: str | os.PathLike, trt_version: str, sm: tuple[int, int]) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every engine built in `cache_dir`."""
    return Path(cache_dir) / f"timing_trt{trt_version}_{_sm(sm)}.cache"


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; stored as JSON beside it. Any difference means: rebuild."""

    trt_version: str
    compute_capability: tuple[int, int]
    precision: str
    onnx_sha256: str
    max_batch: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))

    @property
    def file_name(self) -> str:
        return engine_file_name(self.precision, self.trt_version, self.compute_capability)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineKey":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not names.issubset(data):
            raise ValueError("engine key JSON lacks fields")
        return cls(**{k: data[k] for k in names})

    def mismatches(self, other: "EngineKey") -> list[str]:
        """Human-readable differences `self -> other` (empty when the engine can be reused)."""
        labels = {
            "trt_version": "TensorRT",
            "compute_capability": "GPU compute capability",
            "precision": "precision",
            "onnx_sha256": "ONNX sha256",
            "max_batch": "max batch",
        }
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                if f.name == "onnx_sha256":
                    a, b = str(a)[:12], str(b)[:12]
                out.append(f"{labels[f.name]} {a} -> {b}")
        return out


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def read_engine_key(engine_path: str | os.PathLike) -> EngineKey | None:
    """The key stored beside an engine, or None when the engine or a readable sidecar is missing."""
    side = sidecar_path(engine_path)
    if not Path(engine_path).is_file() or not side.is_file():
        return None
    try:
        return EngineKey.from_json(side.read_text(encoding="utf-8"))
    except (ValueError, TypeError, OSError):
        return None


# Which layers stay FP32 under the FP16 builder flag (TensorRT 10.0-10.11). The rule, by TensorRT layer type
# (trt.LayerType name) and layer name (the ONNX node name, e.g. "/ln_1/LayerNormalization" from the
# TorchScript exporter or "node_linalg_vector_norm" from the dynamo exporter):
#   * NORMALIZATION, REDUCE, RESIZE: always (LayerNorm / the adapter standardisation, mean / L2 / max
#     reductions, the bilinear upsampling of the logits). FP16 LayerNorm after attention overflows.
#   * ACTIVATION: only sigmoid (GELU / LeakyReLU stay FP16).
#   * UNARY, ELEMENTWISE: pow, sqrt, div, reciprocal, and anything inside a normalisation (names with
#     "norm"/"ln"/"normalize"), i.e. the arithmetic of a decomposed LayerNorm or L2 normalisation.
#   * MATRIX_MULTIPLY: only the scoring dot products (names with the tokens dt, score, logit); the builder
#     also keeps any matmul whose operand is a vector (the baked dt) in FP32 (`_is_vector_matmul`).
#   * everything else (convolution, backbone matmuls, softmax, shuffles, constants): FP16 allowed.
# The builder additionally keeps everything downstream of a sigmoid (the small scoring tail) in FP32.
_ALWAYS_FP32_TYPES = frozenset({"NORMALIZATION", "REDUCE", "RESIZE"})
_ARITH_TYPES = frozenset({"UNARY", "ELEMENTWISE"})
_ARITH_KEYS = ("pow", "sqrt", "div", "reciprocal", "norm", "normaliz")
_MATMUL_TOKENS = frozenset({"dt", "score", "logit", "logits"})
_NORM_SCOPE_TOKENS = frozenset({"ln", "norm", "layernorm"})


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^0-9a-z]+", name.lower()) if t}


def fp32_island(layer_type_name: str, layer_name: str) -> bool:
    """True if this layer must stay FP32 when the FP16 builder flag is set (rule in the comment above)."""
    kind = layer_type_name.upper().removeprefix("LAYERTYPE.")
    name = layer_name.lower()
    tokens = _tokens(name)
    if kind in _ALWAYS_FP32_TYPES:
        return True
    if kind == "ACTIVATION":
        return "sigmoid" in name
    if kind in _ARITH_TYPES:
        return any(k in name for k in _ARITH_KEYS) or bool(tokens & _NORM_SCOPE_TOKENS)
    if kind == "MATRIX_MULTIPLY":
        return bool(tokens & _MATMUL_TOKENS)
    return False


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of an ONNX file plus its external-data sibling (`model.onnx.data`) if there is one."""
    digest = hashlib.sha256()
    for part in (Path(path), Path(str(path) + ".data")):
        if part.is_file():
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------
# Needs tensorrt / cuda-python
# ----------------------------------------------------------------------------------------------------------


def import_tensorrt() -> Any:
    """The tensorrt module, or one-line BackendUnavailable (it comes from JetPack or NVIDIA's wheels)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 (optional, heavy)
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc.__class__.__name__}: {exc}); on Jetson it ships with JetPack, "
            'elsewhere: pip install "madclip[trt]"'
        ) from None
    typing_mode(trt.__version__)  # raises for TensorRT < 10
    return trt


def import_cudart() -> Any:
    """cuda-python's CUDA runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # noqa: PLC0415
        except ImportError:
            raise BackendUnavailable(
                "cuda-python is not installed (needed for TensorRT buffers): pip install cuda-python"
            ) from None
    return cudart


def _check(cudart: Any, result: tuple) -> Any:
    """cuda-python calls return (err, *values): raise on error, else return the value(s)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise BackendUnavailable(f"CUDA error {getattr(err, 'name', err)}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_count() -> int:
    """Number of CUDA devices visible through cuda-python (0 when cuda-python, a driver or a GPU is missing)."""
    try:
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
    except (BackendUnavailable, RuntimeError, OSError):
        return 0
    return int(count) if err == cudart.cudaError_t.cudaSuccess else 0


def compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) of a CUDA device, e.g. (8, 7) for Jetson Orin."""
    cudart = import_cudart()
    attr = cudart.cudaDeviceAttr
    major = _check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = _check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    return int(major), int(minor)


def _network_flags(trt: Any, precision: str, version: tuple[int, int, int]) -> int:
    """create_network flags: strongly typed for the FP16 strongly typed path (implicit and ignored in 11+)."""
    if precision == "fp16" and typing_mode(version) == "strongly_typed" and version[0] < 11:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is the only mode since TensorRT 10 (EXPLICIT_BATCH is deprecated, ignored)


def _is_float(trt: Any, dtype: Any) -> bool:
    return dtype in (trt.float32, trt.float16)


def _is_vector_matmul(trt: Any, layer: Any) -> bool:
    """A matmul with a vector operand ([E] or [..., E, 1]): the dot product with the baked dt."""
    if layer.type != trt.LayerType.MATRIX_MULTIPLY:
        return False
    if trt.MatrixOperation.VECTOR in (layer.op0, layer.op1):
        return True
    other = layer.get_input(1)
    shape = tuple(other.shape) if other is not None else ()
    return len(shape) == 1 or (len(shape) >= 2 and shape[-1] == 1)


def constrain_fp32_islands(trt: Any, network: Any) -> int:
    """Pin FP32 islands (`fp32_island`, vector matmuls, everything after a sigmoid) to FP32; returns count.

    Only layers whose outputs are all floating point are constrained (shape arithmetic stays untouched).
    Layers are visited in network order, which is topological for parsed ONNX graphs.
    """
    tail_tensors: set[str] = set()
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        in_tail = any(t is not None and t.name in tail_tensors for t in inputs)
        is_sigmoid = layer.type == trt.LayerType.ACTIVATION and fp32_island(layer.type.name, layer.name)
        if is_sigmoid or in_tail:
            tail_tensors.update(t.name for t in outputs)
        island = in_tail or fp32_island(layer.type.name, layer.name) or _is_vector_matmul(trt, layer)
        if not island or not outputs or not all(_is_float(trt, t.dtype) for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(len(outputs)):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


class _TrtLogger:
    """A trt.ILogger forwarding TensorRT messages to Python logging (created lazily: needs tensorrt)."""

    _instance: Any = None

    @classmethod
    def get(cls, trt: Any) -> Any:
        if cls._instance is None:

            class Forward(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    if severity == trt.ILogger.VERBOSE:
                        return  # the builder is very chatty at VERBOSE
                    level = {
                        trt.ILogger.INTERNAL_ERROR: logging.ERROR,
                        trt.ILogger.ERROR: logging.ERROR,
                        trt.ILogger.WARNING: logging.WARNING,
                        trt.ILogger.INFO: logging.DEBUG,
                    }.get(severity, logging.DEBUG)
                    log.log(level, "TensorRT: %s", msg)

            cls._instance = Forward()
        return cls._instance


def _progress_monitor(trt: Any, progress: Callable[[str], None]) -> Any:
    """A trt.IProgressMonitor that reports top-level builder phases through `progress`."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if not parent_phase:
                progress(f"TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            return None

    return Monitor()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str = "fp16",
    max_batch: int = 8,
    workspace_bytes: int = 2 << 30,
    timing_cache_path: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    onnx_sha256: str | None = None,
) -> EngineKey:
    """Parse `onnx_path`, build a serialized engine (profile batch 1..max_batch), write it and its key atomically.

    The timing cache at `timing_cache_path` is loaded if present and saved back after the build.
    """
    check_trt_precision(precision)
    trt = import_tensorrt()
    version = parse_trt_version(trt.__version__)
    mode = typing_mode(version)
    say = progress or (lambda msg: log.info("%s", msg))
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: model file not found")
    cc = compute_capability()
    key = EngineKey(trt.__version__, cc, precision, onnx_sha256 or file_sha256(onnx_path), int(max_batch))

    logger = _TrtLogger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, precision, version))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT cannot parse the model: {errors or 'unknown parser error'}")

    image = next((network.get_input(i) for i in range(network.num_inputs)
                  if network.get_input(i).name == INPUT_NAME), None)
    if image is None:
        raise BundleError(f"{onnx_path}: the model has no input named '{INPUT_NAME}'")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *profile_shapes(tuple(image.shape)[1:], max_batch))
    config.add_optimization_profile(profile)
    if precision == "fp16" and mode == "fp16_flag":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = constrain_fp32_islands(trt, network)
        log.info("FP16 builder flag (TensorRT %s): %d layers pinned to FP32", trt.__version__, pinned)
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor  # must outlive the build

    cache_file = Path(timing_cache_path) if timing_cache_path else None
    blob = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    cache = config.create_timing_cache(blob)  # empty bytes -> a new, empty cache
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a foreign cache is not used

    say(f"building {precision} engine ({mode if precision == 'fp16' else 'fp32'}, batch 1..{max_batch})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    log.info("engine built in %.1f s", time.perf_counter() - start)
    _atomic_write(engine_path, memoryview(serialized))
    _atomic_write(sidecar_path(engine_path), key.to_json().encode("utf-8"))
    if cache_file is not None:
        _atomic_write(cache_file, memoryview(config.get_timing_cache().serialize()))
    say(f"wrote {engine_path}")
    return key


def ensure_engine(
    onnx_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    precision: str,
    max_batch: int,
    onnx_sha256: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Path of an engine for this TensorRT, GPU, precision and ONNX: the cached one if its key matches, else built."""
    check_trt_precision(precision)
    trt = import_tensorrt()
    if gpu_count() == 0:
        raise BackendUnavailable("TensorRT backend needs a CUDA GPU, none is visible")
    cc = compute_capability()
    sha = onnx_sha256 or file_sha256(onnx_path)
    want = EngineKey(trt.__version__, cc, precision, sha, int(max_batch))
    engine_path = Path(cache_dir) / want.file_name
    have = read_engine_key(engine_path)
    if have == want:
        log.info("using cached TensorRT engine %s", engine_path)
        return engine_path
    why = "no cached engine" if have is None else "cache mismatch: " + ", ".join(have.mismatches(want))
    log.info(
        "building TensorRT engine %s (%s); this can take minutes on a Jetson", engine_path.name, why
    )
    build_engine(
        onnx_path, engine_path, precision=precision, max_batch=max_batch,
        timing_cache_path=timing_cache_path(cache_dir, trt.__version__, cc), progress=progress, onnx_sha256=sha,
    )
    return engine_path


class TrtRunner:
    """Runs a serialized engine: device buffers sized for the profile's max batch, one CUDA stream."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = self._trt = import_tensorrt()
        cudart = self._cudart = import_cudart()
        if gpu_count() == 0:
            raise BackendUnavailable("TensorRT backend needs a CUDA GPU, none is visible")
        self._device: dict[str, int] = {}
        self._stream = None
        runtime = trt.Runtime(_TrtLogger.get(trt))
        engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"{engine_path}: TensorRT cannot load this engine (built by another TensorRT or GPU?); "
                "delete it to rebuild"
            )
        self._runtime, self._engine = runtime, engine
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._inputs != [INPUT_NAME]:
            raise BundleError(f"{engine_path}: engine inputs {self._inputs}, expected ['{INPUT_NAME}']")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        _, _, max_shape = engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.max_batch = int(max_shape[0])
        self.input_chw = tuple(int(d) for d in max_shape[1:])
        # Size every buffer for the largest profile shape, once.
        self._context.set_input_shape(INPUT_NAME, tuple(max_shape))
        self._stream = _check(cudart, cudart.cudaStreamCreate())
        for name in names:
            shape = tuple(self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * self._dtypes[name].itemsize
            self._device[name] = int(_check(cudart, cudart.cudaMalloc(max(nbytes, 1))))
            self._context.set_tensor_address(name, self._device[name])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images [B, 3, H, W] with 1 <= B <= max_batch -> {output name: array [B, ...]}."""
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        batch = images.shape[0]
        if not 1 <= batch <= self.max_batch or tuple(images.shape[1:]) != self.input_chw:
            raise InputError(
                f"TensorRT engine takes [1..{self.max_batch}, {', '.join(map(str, self.input_chw))}], "
                f"got {list(images.shape)}"
            )
        host_in = np.ascontiguousarray(images, dtype=self._dtypes[INPUT_NAME])
        if not self._context.set_input_shape(INPUT_NAME, tuple(host_in.shape)):
            raise InputError(f"TensorRT rejected input shape {list(host_in.shape)}")
        _check(cudart, cudart.cudaMemcpyAsync(
            self._device[INPUT_NAME], host_in.ctypes.data, host_in.nbytes, kind.cudaMemcpyHostToDevice, self._stream
        ))
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendUnavailable("TensorRT execute_async_v3 failed (see the TensorRT log)")
        outputs = {}
        for name in self._outputs:
            host = np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._dtypes[name])
            _check(cudart, cudart.cudaMemcpyAsync(
                host.ctypes.data, self._device[name], host.nbytes, kind.cudaMemcpyDeviceToHost, self._stream
            ))
            outputs[name] = host
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        return {name: arr.astype(np.float32, copy=False) for name, arr in outputs.items()}

    def close(self) -> None:
        """Free device buffers and the stream; idempotent."""
        cudart = self._cudart
        for ptr in self._device.values():
            cudart.cudaFree(ptr)
        self._device = {}
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._context = self._engine = self._runtime = None

    def __del__(self) -> None:
        try:
            if getattr(self, "_device", None) or getattr(self, "_stream", None) is not None:
                self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
