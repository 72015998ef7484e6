"""TensorRT engines for a bundle model: build on the target, cache by key, run with execute_async_v3.

An engine only runs on the TensorRT version and GPU it was built for, so engines are built on the target and
cached under a file name that hashes their `EngineKey` (TensorRT version, GPU, precision recipe, the model's
content id, batch profile, rules version), with the key as JSON beside them. The rules (which ONNX file,
strongly typed or FP16 flag, FP32 islands, TF32) live in `trt_rules`; this module only talks to TensorRT and
cuda-python, following NVIDIA's Python API (Builder, OnnxParser, IBuilderConfig, ITimingCache, Runtime,
IExecutionContext.execute_async_v3 with set_tensor_address). Whether a GPU is there is decided once, by the
caller (`backends`); nothing here probes it again.

`tensorrt` and cuda-python are imported lazily; their absence is a one-line `BackendUnavailable`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..atomic import atomic_write_bytes
from ..errors import BackendUnavailable, BundleError, InputError
from .cuda_probe import check as _check
from .cuda_probe import compute_capability, device_name, import_cudart, native_handle
from .trt_rules import (
    INPUT_NAME,
    EngineKey,
    builder_flags,
    check_trt_precision,
    engine_typing,
    file_sha256,
    fp32_island,
    is_island_constant,
    is_vector_shape,
    parse_trt_version,
    profile_shapes,
    read_engine_key,
    sidecar_path,
    timing_cache_path,
    typing_mode,
)

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The tensorrt module, or one-line BackendUnavailable (it comes from JetPack or NVIDIA's wheels)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 (optional, heavy)
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT is not installed ({exc.__class__.__name__}: {exc}); on Jetson it ships with JetPack "
            '(see docs/gpu.md), elsewhere: pip install "madclip[trt]"'
        ) from None
    typing_mode(trt.__version__, "auto")  # raises for TensorRT < 10
    return trt


def _network_flags(trt: Any, typing: str, version: tuple[int, int, int]) -> int:
    """create_network flags: STRONGLY_TYPED for the strongly typed FP16 recipe (implicit, ignored in 11+)."""
    if typing == "strongly_typed" and version[0] < 11:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is the only mode since TensorRT 10 (EXPLICIT_BATCH is deprecated, ignored)


def _is_float(trt: Any, dtype: Any) -> bool:
    return dtype in (trt.float32, trt.float16)


def _downcast(trt: Any, layer: Any) -> Any:
    """`network.get_layer(i)` returns a plain `trt.ILayer`: the layer-specific attributes (here
    IMatrixMultiplyLayer.op0 / op1) exist only after re-classing the object, as Polygraphy does before reading
    them (tools/Polygraphy/polygraphy/backend/trt/util.py: `layer.__class__ =
    LAYER_TYPE_CLASS_MAPPING[layer.type]`; the properties are bound on IMatrixMultiplyLayer only, in
    python/src/infer/pyGraph.cpp). Only a MATRIX_MULTIPLY layer is re-classed, and only to its own class."""
    if layer.type == trt.LayerType.MATRIX_MULTIPLY:
        layer.__class__ = trt.IMatrixMultiplyLayer
    return layer


def _constant_source(trt: Any, tensor: Any, producers: dict[str, Any]) -> Any:
    """The CONSTANT layer `tensor` comes from, following the SHUFFLE layers the ONNX parser inserts between an
    initializer and its consumer (unsqueeze of a 1-D MatMul operand, rank broadcast: onnx-tensorrt
    importerUtils.cpp `unsqueezeTensor` / `broadcastTensor`, layers "ONNXTRT_unsqueezeTensor" and
    "ONNXTRT_Broadcast"); None when it is computed."""
    for _ in range(8):
        layer = producers.get(tensor.name) if tensor is not None else None
        if layer is None:
            return None
        if layer.type == trt.LayerType.CONSTANT:
            return layer
        if layer.type != trt.LayerType.SHUFFLE or layer.num_inputs < 1:
            return None
        tensor = layer.get_input(0)
    return None


def _is_vector_matmul(trt: Any, layer: Any, producers: dict[str, Any]) -> bool:
    """A matmul with a constant vector operand: the dot product with a baked text direction (MadCLIP's `dt`).

    The parser passes kVECTOR only when an operand is still 1-D after broadcasting; a 1-D initializer read
    by a higher-rank MatMul arrives as [1, ..., E, 1] instead (onnxOpImporters.cpp, MatMul). Both count,
    provided the operand is a constant (through the parser's reshapes), never an activation."""
    if layer.type != trt.LayerType.MATRIX_MULTIPLY:
        return False
    layer = _downcast(trt, layer)
    ops = (layer.op0, layer.op1)
    for j in range(min(layer.num_inputs, 2)):
        operand = layer.get_input(j)
        if operand is None or _constant_source(trt, operand, producers) is None:
            continue
        if ops[j] == trt.MatrixOperation.VECTOR or is_vector_shape(tuple(operand.shape)):
            return True
    return False


def constrain_fp32_islands(trt: Any, network: Any, tail_constants: tuple[str, ...]) -> int:
    """Pin FP32 islands (`trt_rules.fp32_island`) and the score head to FP32; returns the count pinned.

    The head (the "tail") is found by structure, as TensorRT's ONNX parser leaves the graph: it starts at the
    CONSTANT layers named after the method's `tail_constants` (`is_island_constant`; their output tensors
    carry TensorRT's default names, not the initializers') and at matmuls with a constant vector operand
    (`_is_vector_matmul`), and takes everything downstream. Only layers whose outputs are all floating point
    are constrained (shape arithmetic stays untouched). Layers are visited in network order, which is
    topological for parsed ONNX graphs.
    """
    constants = tuple(tail_constants)
    producers: dict[str, Any] = {}
    tail_tensors: set[str] = set()
    found: list[str] = []
    vector_matmuls = 0
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        for t in outputs:
            producers[t.name] = layer
        if layer.type == trt.LayerType.CONSTANT:
            if not is_island_constant(layer.name, constants):
                continue
            found.append(layer.name)
            tail_tensors.update(t.name for t in outputs)
            in_tail = True
        else:
            in_tail = any(t is not None and t.name in tail_tensors for t in inputs)
            if not in_tail and _is_vector_matmul(trt, layer, producers):
                in_tail = True
                vector_matmuls += 1
            if in_tail:
                tail_tensors.update(t.name for t in outputs)
        divisor = inputs[1] if len(inputs) > 1 else None
        constant_divisor = divisor is not None and _constant_source(trt, divisor, producers) is not None
        island = in_tail or fp32_island(layer.type.name, layer.name, constant_divisor)
        if not island or not outputs or not all(_is_float(trt, t.dtype) for t in outputs):
            continue
        if layer.type != trt.LayerType.CONSTANT:  # a constant computes nothing: only its output type is set
            layer.precision = trt.float32
        for j in range(len(outputs)):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    if not found and not vector_matmuls:
        log.warning(
            "FP16 builder flag: none of the FP32-tail constants %s is in the network; the score head "
            "is not pinned to FP32 (check the bundle's fp32_islands)",
            list(constants),
        )
    else:
        log.info("FP32 tail from constants %s and %d constant-vector matmul(s)", found, vector_matmuls)
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


def attach_timing_cache(trt: Any, config: Any, blob: bytes) -> Any:
    """Create a timing cache from `blob` and attach it; a cache that fails to attach (another GPU or
    TensorRT build: set_timing_cache returns False) is replaced by a fresh one. Returns the attached cache,
    or None when even a fresh one cannot be attached (the build then runs without a timing cache)."""
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, False):  # ignore_mismatch=False
        return cache
    if blob:
        log.warning(
            "TensorRT timing cache not usable here (built on another GPU or TensorRT?); starting a new one"
        )
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, False):
            return cache
    log.warning("TensorRT could not attach a timing cache; building without one")
    return None


WORKSPACE_BYTES = 2 << 30


def engine_key(
    onnx_path: str | os.PathLike,
    precision: str,
    max_batch: int,
    model_sha256: str | None = None,
    fp32_islands: tuple[str, ...] = (),
    workspace_bytes: int = WORKSPACE_BYTES,
) -> EngineKey:
    """The key of the engine this machine would build for `onnx_path` (asks TensorRT and the GPU): everything
    that changes the engine, so a cached one is reused only when it would be built the same way."""
    check_trt_precision(precision)
    trt = import_tensorrt()
    typing = engine_typing(precision, trt.__version__)
    return EngineKey(
        trt_version=trt.__version__,
        compute_capability=compute_capability(),
        precision=precision,
        model_sha256=model_sha256 or file_sha256(onnx_path),
        max_batch=int(max_batch),
        gpu_name=device_name(),
        typing=typing,
        fp32_islands=tuple(fp32_islands),
        builder_flags=builder_flags(typing),
        workspace_bytes=int(workspace_bytes),
    )


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    key: EngineKey,
    workspace_bytes: int | None = None,
    timing_cache_file: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    fp32_islands: tuple[str, ...] = (),
) -> EngineKey:
    """Parse `onnx_path`, build a serialized engine for `key` (profile batch 1..max_batch), write it and
    its key atomically. The timing cache at `timing_cache_file` is loaded if present and saved back."""
    trt = import_tensorrt()
    precision = key.precision
    version = parse_trt_version(trt.__version__)
    say = progress or (lambda msg: log.info("%s", msg))
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: model file not found")

    logger = _TrtLogger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, key.typing, version))
    parser = trt.OnnxParser(network, logger)
    say(f"parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path}: TensorRT cannot parse the model: {errors or 'unknown parser error'}")

    image = next(
        (network.get_input(i) for i in range(network.num_inputs) if network.get_input(i).name == INPUT_NAME),
        None,
    )
    if image is None:
        raise BundleError(f"{onnx_path}: the model has no input named '{INPUT_NAME}'")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(
        trt.MemoryPoolType.WORKSPACE, int(workspace_bytes or key.workspace_bytes or WORKSPACE_BYTES)
    )
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *profile_shapes(tuple(image.shape)[1:], key.max_batch))
    config.add_optimization_profile(profile)
    configure_precision(trt, config, network, key, tuple(key.fp32_islands or fp32_islands))
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor  # must outlive the build

    cache_file = Path(timing_cache_file) if timing_cache_file else None
    blob = cache_file.read_bytes() if cache_file is not None and cache_file.is_file() else b""
    attach_timing_cache(trt, config, blob)

    say(f"building {precision} engine ({key.typing}, batch 1..{key.max_batch})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailable(
            f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)"
        )
    log.info("engine built in %.1f s", time.perf_counter() - start)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, memoryview(serialized))
    atomic_write_bytes(sidecar_path(engine_path), key.to_json().encode("utf-8"))
    if cache_file is not None:
        final = config.get_timing_cache()
        if final is not None:
            atomic_write_bytes(cache_file, memoryview(final.serialize()))
    say(f"wrote {engine_path}")
    return key


def configure_precision(
    trt: Any, config: Any, network: Any, key: EngineKey, fp32_islands: tuple[str, ...] = ()
) -> None:
    """Builder flags for the key's recipe (`trt_rules.builder_flags`, part of the key): TF32 cleared for fp32;
    FP16 flag + obeyed FP32 islands for "fp16_flag" (the tail starts at the method's `fp32_islands`
    constants, recorded in the bundle's metadata); nothing for "strongly_typed" (the types come from the
    file; precision flags are refused)."""
    for flag in builder_flags(key.typing):
        member = getattr(trt.BuilderFlag, flag[1:])
        if flag.startswith("-"):
            config.clear_flag(member)
        else:
            config.set_flag(member)
    if key.typing == "fp16_flag":
        if not fp32_islands:  # no MadCLIP default: the bundle's metadata names the method's own constants
            raise ValueError(
                "an FP16-flag TensorRT build needs the method's fp32_islands (the bundle's metadata)"
            )
        pinned = constrain_fp32_islands(trt, network, tuple(fp32_islands))
        log.info("FP16 builder flag (TensorRT %s): %d layers pinned to FP32", trt.__version__, pinned)


def ensure_engine(
    onnx_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    precision: str,
    max_batch: int,
    model_sha256: str | None = None,
    progress: Callable[[str], None] | None = None,
    fp32_islands: tuple[str, ...] = (),
) -> Path:
    """Path of an engine for this TensorRT, GPU, precision recipe and model: the cached one if its key
    matches, else built. The file name hashes the key, so a cache dir shared by several models or processes
    never hands out another model's engine; writes are atomic, so a concurrent build replaces the file with
    an engine of the same key. The caller has checked that a GPU is present."""
    want = engine_key(onnx_path, precision, max_batch, model_sha256, fp32_islands=tuple(fp32_islands))
    engine_path = Path(cache_dir) / want.file_name
    have = read_engine_key(engine_path)
    if have == want:
        log.info("using cached TensorRT engine %s", engine_path)
        return engine_path
    why = "no cached engine" if have is None else "cache mismatch: " + ", ".join(have.mismatches(want))
    log.info("building TensorRT engine %s (%s); this can take minutes on a Jetson", engine_path.name, why)
    build_engine(
        onnx_path,
        engine_path,
        want,
        timing_cache_file=timing_cache_path(cache_dir, want.trt_version, want.compute_capability),
        progress=progress,
        fp32_islands=tuple(fp32_islands),
    )
    return engine_path


class TrtRunner:
    """Runs a serialized engine: device and pinned host buffers sized for the profile's max batch, one
    CUDA stream; copies are asynchronous on that stream (pinned memory makes them truly asynchronous)."""

    def __init__(self, engine_path: str | os.PathLike):
        trt = self._trt = import_tensorrt()
        cudart = self._cudart = import_cudart()
        self._device: dict[str, int] = {}
        self._pinned: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
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
        self._stream_handle = native_handle(self._stream)
        for name in names:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            nbytes = max(int(np.prod(shape)) * self._dtypes[name].itemsize, 1)
            self._device[name] = int(_check(cudart, cudart.cudaMalloc(nbytes)))
            self._context.set_tensor_address(name, self._device[name])
            self._pinned[name] = int(_check(cudart, cudart.cudaMallocHost(nbytes)))
            raw = (ctypes.c_byte * nbytes).from_address(self._pinned[name])
            self._host[name] = np.frombuffer(raw, dtype=self._dtypes[name], count=int(np.prod(shape)))

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images [B, 3, H, W] with 1 <= B <= max_batch -> {output name: array [B, ...]}."""
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        batch = images.shape[0]
        if not 1 <= batch <= self.max_batch or tuple(images.shape[1:]) != self.input_chw:
            raise InputError(
                f"TensorRT engine takes [1..{self.max_batch}, {', '.join(map(str, self.input_chw))}], "
                f"got {list(images.shape)}"
            )
        if not self._context.set_input_shape(INPUT_NAME, tuple(images.shape)):
            raise InputError(f"TensorRT rejected input shape {list(images.shape)}")
        host_in = self._host[INPUT_NAME][: images.size].reshape(images.shape)
        host_in[...] = images  # into pinned memory (dtype conversion included)
        _check(
            cudart,
            cudart.cudaMemcpyAsync(
                self._device[INPUT_NAME],
                self._pinned[INPUT_NAME],
                host_in.nbytes,
                kind.cudaMemcpyHostToDevice,
                self._stream,
            ),
        )
        if not self._context.execute_async_v3(self._stream_handle):
            raise BackendUnavailable("TensorRT execute_async_v3 failed (see the TensorRT log)")
        views = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            view = self._host[name][: int(np.prod(shape))].reshape(shape)
            _check(
                cudart,
                cudart.cudaMemcpyAsync(
                    self._pinned[name],
                    self._device[name],
                    view.nbytes,
                    kind.cudaMemcpyDeviceToHost,
                    self._stream,
                ),
            )
            views[name] = view
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        # Copies: the pinned buffers are reused by the next call.
        return {name: np.array(view, dtype=np.float32) for name, view in views.items()}

    def close(self) -> None:
        """Free device and pinned buffers and the stream; idempotent."""
        cudart = self._cudart
        self._host = {}
        for ptr in self._device.values():
            cudart.cudaFree(ptr)
        for ptr in self._pinned.values():
            cudart.cudaFreeHost(ptr)
        self._device, self._pinned = {}, {}
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
