"""The authors' checkpoint format -> MediCLIP tensor names (no trained weights were released; users who
trained with the reference code can convert their own `checkpoints_{epoch}.pkl`).

Reference layout (train.py torch.save): {"adapter_state_dict": {"{i}_adapter.0.weight" [768, 1024, 1, 1],
"{i}_adapter.0.bias" [768]} for i = 0, 1, 2 (blocks 12/18/24), "prompt_state_dict": {"ctx.normal_end"
[10, 8, 768], "ctx.abnormal_end" [11, 8, 768]}}. Read with torch.load(weights_only=True): no code runs.
"""

from __future__ import annotations

import torch

from madclip_runtime.errors import MadclipError

FORMAT = (
    "a MediCLIP training checkpoint (checkpoints_N.pkl: adapter_state_dict with {i}_adapter.0.weight/bias, "
    "prompt_state_dict with ctx.normal_end, ctx.abnormal_end)"
)


def convert_reference(ref: dict, n_layers: int = 3, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """-> {"adapters.{i}.weight" [E, W], "adapters.{i}.bias" [E], "prompts.ctx.{normal,abnormal}_end"}."""
    if not isinstance(ref, dict) or "adapter_state_dict" not in ref or "prompt_state_dict" not in ref:
        keys = ", ".join(sorted(map(str, ref))[:6]) if isinstance(ref, dict) else type(ref).__name__
        raise MadclipError(f"{source}: not {FORMAT} (found: {keys})")
    ad, pr = ref["adapter_state_dict"], ref["prompt_state_dict"]
    out: dict[str, torch.Tensor] = {}
    try:
        for i in range(n_layers):
            w = ad[f"{i}_adapter.0.weight"]
            if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1):
                raise MadclipError(
                    f"{source}: {i}_adapter.0.weight has shape {tuple(w.shape)}, expected [E, W, 1, 1]"
                )
            out[f"adapters.{i}.weight"] = w[:, :, 0, 0].float().contiguous()
            out[f"adapters.{i}.bias"] = ad[f"{i}_adapter.0.bias"].float().contiguous()
        for cls in ("normal", "abnormal"):
            out[f"prompts.ctx.{cls}_end"] = pr[f"ctx.{cls}_end"].float().contiguous()
    except KeyError as exc:
        raise MadclipError(f"{source}: missing tensor {exc.args[0]} ({FORMAT})") from None
    return out


def to_reference(state: dict[str, torch.Tensor], n_layers: int = 3) -> dict:
    """`trainable_state()` names -> the authors' layout (the inverse of `convert_reference`)."""
    ad = {}
    for i in range(n_layers):
        ad[f"{i}_adapter.0.weight"] = state[f"adapters.{i}.weight"][:, :, None, None].contiguous()
        ad[f"{i}_adapter.0.bias"] = state[f"adapters.{i}.bias"]
    prompts = {f"ctx.{c}_end": state[f"prompts.ctx.{c}_end"] for c in ("normal", "abnormal")}
    return {"adapter_state_dict": ad, "prompt_state_dict": prompts}
