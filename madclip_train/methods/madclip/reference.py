"""The authors' released MadCLIP checkpoints (per-dataset .pth) -> MadCLIP's tensor names."""

from __future__ import annotations

import torch

from madclip_runtime.errors import MadclipError

REFERENCE_FORMAT = (
    "the authors' per-dataset .pth: {normal,abnormal}_det_adapters (fc1, fc2 = det, fc3 = seg) "
    "and prompt_maker_{normal,abnormal} context vectors"
)
REF_HEADS = {"fc1": "fc1", "fc2": "det", "fc3": "seg"}


def convert_reference(ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
    """`{normal,abnormal}_det_adapters.{j}.fc{1,2,3}.0.weight` -> `adapters.{branch}.{j}.{fc1,det,seg}.weight`
    (fc2 is the det head, fc3 the seg head); `prompt_maker_{normal,abnormal}` `prompt_learner.ctx.{cls}_{pos}`
    -> `prompts.ctx.{cls}_{pos}`: the normal-class context from prompt_maker_normal and the abnormal-class
    context from prompt_maker_abnormal when both makers hold both; the frozen text tower copy is ignored."""
    out: dict[str, torch.Tensor] = {}
    for branch in ("normal", "abnormal"):
        sd = ref.get(f"{branch}_det_adapters")
        if not isinstance(sd, dict):
            raise MadclipError(f"reference checkpoint lacks '{branch}_det_adapters'")
        for j in range(n_layers):
            for ref_name, ours in REF_HEADS.items():
                key = f"{j}.{ref_name}.0.weight"
                if key not in sd:
                    raise MadclipError(f"reference checkpoint lacks {branch}_det_adapters.{key}")
                out[f"adapters.{branch}.{j}.{ours}.weight"] = sd[key].float()
    makers = {c: ref.get(f"prompt_maker_{c}") for c in ("normal", "abnormal")}
    for cls_name in ("normal", "abnormal"):
        for pos in ("end", "front", "middle"):
            key = f"prompt_learner.ctx.{cls_name}_{pos}"
            order = [makers[cls_name], makers["abnormal" if cls_name == "normal" else "normal"]]
            src = next((m[key] for m in order if isinstance(m, dict) and key in m), None)
            if src is None:
                raise MadclipError(f"reference checkpoint lacks {key} in prompt_maker_{cls_name}")
            out[f"prompts.ctx.{cls_name}_{pos}"] = src.float()
    return out


def to_reference(state: dict[str, torch.Tensor], n_layers: int = 4) -> dict:
    """`trainable_state()` names -> the authors' layout (the inverse of `convert_reference`): each prompt
    maker holds its own class's context vectors."""
    ref: dict = {}
    for b in ("normal", "abnormal"):
        ref[f"{b}_det_adapters"] = {
            f"{j}.{theirs}.0.weight": state[f"adapters.{b}.{j}.{ours}.weight"]
            for j in range(n_layers)
            for theirs, ours in REF_HEADS.items()
        }
        ref[f"prompt_maker_{b}"] = {
            f"prompt_learner.ctx.{b}_{pos}": state[f"prompts.ctx.{b}_{pos}"]
            for pos in ("end", "front", "middle")
        }
    return ref
