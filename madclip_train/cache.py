"""Feature cache: the part of a method's forward pass that is a pure function of the image, computed once.

What that part is, is the method's (`MethodModel.cacheable`): for MadCLIP, whose adapters never write into the
residual stream, all tapped backbone features. They are stored (fp16 by default) and reused by every epoch.
"memory" keeps them in RAM; "disk" also stores them in a safetensors file keyed by the image content, the
method's `cache_identity()` (backbone, weights fingerprint, image size, taps, cache boundary) and the dtype, so a
second run on the same shots skips the backbone.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

import torch

from madclip_runtime.atomic import atomic_write_bytes
from madclip_runtime.engines.trt_rules import cache_root

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_CACHE_DIR = (
    cache_root() / "features"
)  # the one cache root (madclip_runtime.engines.trt_rules.cache_root)


def cache_key(images: torch.Tensor, backbone_id: dict, dtype: str) -> str:
    """sha256 over the image tensor bytes [N, 3, S, S] and everything that determines the features."""
    h = hashlib.sha256()
    h.update(images.detach().cpu().contiguous().float().numpy().tobytes())
    for k in sorted(backbone_id):
        h.update(f"{k}={backbone_id[k]};".encode())
    h.update(dtype.encode())
    return h.hexdigest()


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int,
    dtype: str,
    device: torch.device,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """images [N, 3, S, S] -> fn's features [N, ...] in `dtype` on the CPU (rounded once, like the cache)."""
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        chunks.append(fn(batch).to(DTYPES[dtype]).cpu())  # [b, ...]
        if advance:
            advance(batch.shape[0])
    return torch.cat(chunks, dim=0)


def load_or_extract(
    fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    backbone_id: dict,
    mode: str,
    dtype: str,
    batch_size: int,
    device: torch.device,
    cache_dir: Path | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Features for `images` via the cache `mode` ("memory" or "disk"). Returns (features, info)."""
    from safetensors.torch import load_file, save

    info: dict = {"mode": mode, "dtype": dtype, "hit": False, "path": None}
    path = None
    if mode == "disk":
        key = cache_key(images, backbone_id, dtype)
        path = Path(cache_dir or DEFAULT_CACHE_DIR) / f"{key}.safetensors"
        info["path"] = str(path)
        if path.is_file():
            try:
                feats = load_file(str(path))["features"]
                if feats.shape[0] == images.shape[0]:
                    info["hit"] = True
                    log.info("feature cache hit: %s", path)
                    if advance:
                        advance(images.shape[0])
                    return feats, info
            except Exception as exc:  # corrupt cache file: recompute and overwrite
                log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    feats = extract_features(fn, images, batch_size, dtype, device, advance)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"features": feats.contiguous()}))
        log.info("feature cache written: %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return feats, info
