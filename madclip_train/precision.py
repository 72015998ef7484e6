"""Mixed-precision training: `--precision fp32|fp16|bf16` as one object the training loop asks for its
autocast context and its (scaler-aware) backward + optimizer step.

What runs in reduced precision: the method's training loss (`MethodModel.loss`: for MadCLIP the text tower
with the learned prompts, adapters, head and loss) under `torch.autocast`, as the reference runs its whole step;
autocast itself keeps precision-sensitive ops (log, exp, reductions, norms) in FP32. Parameters, optimizer
state and the checkpoint stay FP32 (autocast never changes parameter dtypes).

Defaults: on CUDA the reference's choice, FP16 autocast (its train.py wraps every step in
`torch.cuda.amp.autocast()`); on the CPU FP32. The reference steps FP16 without a gradient scaler; madclip
uses `torch.amp.GradScaler` for FP16 (small gradients of the prompt context underflow in FP16 otherwise).
BF16 has FP32's exponent range and needs no scaler; it is fast on CPUs with AMX or AVX512-BF16 and on
Ampere or newer GPUs. A precision the device cannot run is refused in one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from madclip_runtime.contract import BF16, FP16, FP32
from madclip_runtime.errors import MadclipError

log = logging.getLogger(__name__)

PRECISIONS = (FP32, FP16, BF16)
REFERENCE_CUDA_PRECISION = FP16  # mahshid1998/MadCLIP train.py: `with torch.cuda.amp.autocast():`
_DTYPES = {FP16: torch.float16, BF16: torch.bfloat16}


def default_precision(device: torch.device) -> str:
    """The reference's choice on CUDA (FP16 autocast), FP32 elsewhere."""
    return REFERENCE_CUDA_PRECISION if device.type == "cuda" else FP32


def cpu_has_fast_bf16() -> bool:
    """The CPU advertises AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo flags); False when unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@functools.lru_cache(maxsize=None)
def autocast_works(device_type: str, precision: str) -> bool:
    """A matmul, a logsigmoid and their backward run under autocast at `precision` on `device_type`."""
    try:
        x = torch.randn(4, 8, device=device_type, requires_grad=True)
        with torch.autocast(device_type, dtype=_DTYPES[precision]):
            y = torch.nn.functional.logsigmoid(x @ x.T)
        y.float().sum().backward()
        return x.grad is not None and bool(torch.isfinite(x.grad).all())
    except (RuntimeError, TypeError, AssertionError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> the default for the device; any other name is checked against what the device can run."""
    if name == "auto":
        name = default_precision(device)
    if name not in PRECISIONS:
        raise MadclipError(f"--precision must be one of auto, {', '.join(PRECISIONS)} (got {name!r})")
    if name == FP32:
        return name
    if device.type == "cuda" and name == BF16 and not torch.cuda.is_bf16_supported():
        raise MadclipError(
            "--precision bf16: this GPU has no BF16 support (needs compute capability 8.0+); use fp16 or fp32"
        )
    if device.type not in ("cuda", "cpu") or not autocast_works(device.type, name):
        raise MadclipError(
            f"--precision {name} is not supported on {device.type} by this torch "
            f"{torch.__version__}; use fp32"
        )
    if device.type == "cpu" and name == FP16:
        log.warning(
            "--precision fp16 on the CPU runs, but CPUs have no fast FP16 matmuls: expect it slower "
            "than fp32 (bf16 is the fast CPU choice with AMX / AVX512-BF16)"
        )
    if device.type == "cpu" and name == BF16 and not cpu_has_fast_bf16():
        log.warning("--precision bf16: this CPU has neither AMX-BF16 nor AVX512-BF16, expect no speed-up")
    return name


@dataclass
class Precision:
    """Autocast context and scaler-aware backward/step for one precision on one device."""

    name: str
    device: torch.device
    scaler: Any = field(default=None, repr=False)

    @classmethod
    def create(cls, name: str, device: torch.device) -> "Precision":
        """`name` already resolved (`resolve_precision`); FP16 gets a gradient scaler."""
        if name not in PRECISIONS:
            raise MadclipError(f"unknown precision {name!r}")
        scaler = torch.amp.GradScaler(device.type) if name == FP16 else None
        return cls(name, device, scaler)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.name, torch.float32)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The training loss is computed inside this (a no-op for fp32)."""
        if self.name == FP32:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """loss.backward() + optimizer.step(), through the gradient scaler for fp16 (skips steps with
        non-finite gradients and adapts the scale, as torch.amp documents)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def record(self) -> dict:
        """What config.json / the training summary record about it."""
        return {
            "precision": self.name,
            "autocast_dtype": None if self.name == FP32 else str(self.dtype),
            "grad_scaler": self.scaler is not None,
            "device": str(self.device),
        }
