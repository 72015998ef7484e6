"""Where training tensors live on a CUDA device: on the GPU when they fit, else in pinned host memory.

The feature cache, labels and masks are read every step. On the GPU they are indexed in place; in pinned
(page-locked) host memory the per-step gather is copied with `non_blocking=True`, which only overlaps
with compute from pinned memory. On the CPU nothing moves.
"""

from __future__ import annotations

import torch

GPU_BUDGET = 0.5  # at most this fraction of the free GPU memory goes to cached tensors


def place_on_device(
    tensor: torch.Tensor, device: torch.device, budget: float = GPU_BUDGET
) -> tuple[torch.Tensor, str]:
    """(tensor on `device` if it fits in `budget` x free memory, else pinned on the host; where it went)."""
    if device.type != "cuda":
        return tensor, "host"
    free, _ = torch.cuda.mem_get_info(device)
    if tensor.numel() * tensor.element_size() <= budget * free:
        return tensor.to(device), "device"
    return tensor.pin_memory(), "pinned-host"


def gather_to_device(
    tensor: torch.Tensor, index: torch.Tensor, device: torch.device, dim: int = 1
) -> torch.Tensor:
    """tensor.index_select(dim, index) on `device`: in place when the tensor is there already; an async copy
    of the gathered rows from pinned host memory otherwise."""
    if tensor.device == device or device.type != "cuda":
        return tensor.index_select(dim, index.to(tensor.device, non_blocking=True)).to(device)
    rows = tensor.index_select(dim, index)
    if tensor.is_pinned():
        rows = rows.pin_memory()
    return rows.to(device, non_blocking=True)
