"""Is there a CUDA GPU, and which one: asked once, through cuda-python, else the CUDA driver library.

cuda-python (`cuda.bindings.runtime`) is what the native TensorRT backend needs for its buffers. Its 13.x
wheels need an R580+ driver; on an older driver (JetPack 6, older workstations) every call returns
cudaErrorInsufficientDriver. That error is not "no GPU": the probe keeps it (`GpuProbe.error`) and asks the
driver library (libcuda) directly, so the onnxruntime CUDA/TensorRT providers stay usable and the TensorRT
backend reports why it cannot run. Nothing here imports cuda-python at module import time.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailable

log = logging.getLogger(__name__)


def import_cudart() -> Any:
    """cuda-python's CUDA runtime bindings (`cuda.bindings.runtime`, or `cuda.cudart` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # noqa: PLC0415
        except ImportError:
            raise BackendUnavailable(
                'cuda-python is not installed (needed for TensorRT buffers): pip install "madclip[trt]"'
            ) from None
    return cudart


def check(cudart: Any, result: tuple) -> Any:
    """cuda-python calls return (err, *values): raise on error, else return the value(s)."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise BackendUnavailable(f"CUDA error {getattr(err, 'name', err)}: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def native_handle(obj: Any) -> int:
    """The address behind a cuda-python object (a stream): `get_cuda_native_handle` from cuda-bindings 13
    on (where `int(obj)` is deprecated), `int(obj)` on 12.x, which has no such helper."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # noqa: PLC0415
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


@dataclass(frozen=True)
class GpuProbe:
    """count: CUDA devices seen; source: who answered; error: why cuda-python could not answer (or None)."""

    count: int
    source: str  # "cuda-python" | "libcuda" | "none"
    error: str | None = None

    @property
    def cudart_ok(self) -> bool:
        """cuda-python itself works (the native TensorRT backend needs it for its buffers)."""
        return self.source == "cuda-python"


def _libcuda_count() -> tuple[int, str | None]:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return 0, f"libcuda.so.1 not loadable ({exc})"
    count = ctypes.c_int(0)
    rc = lib.cuInit(0)
    if rc != 0:
        return 0, f"cuInit failed with CUDA driver error {rc}"
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    return (count.value, None) if rc == 0 else (0, f"cuDeviceGetCount failed with CUDA driver error {rc}")


def probe_gpu() -> GpuProbe:
    """Ask cuda-python, and on any failure of it the driver library; never raises."""
    error = None
    try:
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if err == cudart.cudaError_t.cudaSuccess:
            return GpuProbe(int(count), "cuda-python")
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        error = f"cuda-python: {getattr(err, 'name', err)}: {text}"
    except BackendUnavailable as exc:
        error = str(exc)
    except (RuntimeError, OSError) as exc:  # a broken cuda-python install
        error = f"cuda-python: {exc}"
    count, lib_error = _libcuda_count()
    if count > 0:
        return GpuProbe(count, "libcuda", error)
    return GpuProbe(0, "none", error if lib_error is None else f"{error}; {lib_error}")


@functools.lru_cache(maxsize=1)
def cached_probe() -> GpuProbe:
    """`probe_gpu()` once per process (the GPU set does not change while we run)."""
    result = probe_gpu()
    if result.error and result.count:
        log.warning(
            "GPU found through the CUDA driver, but cuda-python failed (%s); the native TensorRT "
            "backend needs a cuda-python matching the driver (JetPack 6.1/6.2: cuda-python 12.6.x)",
            result.error,
        )
    return result


def gpu_count() -> int:
    """Number of CUDA devices visible (0 when no driver or GPU)."""
    return cached_probe().count


def compute_capability(device: int = 0) -> tuple[int, int]:
    """(major, minor) of a CUDA device, e.g. (8, 7) for Jetson Orin."""
    cudart = import_cudart()
    attr = cudart.cudaDeviceAttr
    major = check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = check(cudart, cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    return int(major), int(minor)


def device_name(device: int = 0) -> str:
    """Marketing name of a CUDA device, e.g. "NVIDIA H100 80GB HBM3" or "Orin"."""
    cudart = import_cudart()
    props = check(cudart, cudart.cudaGetDeviceProperties(device))
    name = props.name
    name = name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
    return name.split("\x00", 1)[0].strip()
