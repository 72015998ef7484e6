"""Can the requested CLIP weights be had here? A fast check (seconds), so scripts can decide before training.

`python -m madclip_train.weights ViT-L-14-336 openai` prints one line and exits 0 when the weights are a local
file, already in the Hugging Face cache, or the hub is reachable; 1 otherwise. It never downloads anything.
"""

from __future__ import annotations

import os
import socket
import sys


def _hub_reachable(host: str = "huggingface.co", timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def weights_available(backbone: str, pretrained: str) -> tuple[bool, str]:
    """(available, one-line reason)."""
    if pretrained == "none":
        return True, "random weights requested"
    if os.path.isfile(pretrained):
        return True, f"{pretrained}: found"
    if os.path.sep in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth")):
        return False, f"{pretrained}: no such file"
    import open_clip

    cfg = open_clip.get_pretrained_cfg(backbone, pretrained)
    if not cfg:
        return False, f"open_clip has no '{pretrained}' weights for {backbone}"
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str) and os.path.isfile(hit):
                return True, f"{backbone} ({pretrained}) weights are in the local cache"
    if _hub_reachable():
        return True, f"{backbone} ({pretrained}) weights can be downloaded from the Hugging Face hub"
    return False, (
        f"{backbone} ({pretrained}) weights are not cached and the Hugging Face hub is unreachable "
        f"(see README, 'CLIP weights')"
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .config import ModelConfig

    default = ModelConfig()  # the default method's reference backbone and weights
    backbone, pretrained = (
        (list(argv) + [default.backbone, default.pretrained])[:2] if len(argv) < 2 else argv[:2]
    )
    ok, reason = weights_available(backbone, pretrained)
    print(reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
