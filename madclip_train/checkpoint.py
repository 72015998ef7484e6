"""Run directories: config.json + checkpoint.safetensors (no pickle), and the authors' released checkpoints.

checkpoint.safetensors holds the trainable state only: `adapters.{normal,abnormal}.{i}.{fc1,det,seg}.weight` and
`prompts.ctx.{normal,abnormal}_{end,front,middle}`, plus the derived constants `text.t_n`, `text.t_ab` (so the
exporter and tests can check the rebuilt text tower reproduces them). The frozen backbone is rebuilt from
config.json (open_clip name + weights); its fingerprint is checked so a run is never served on other weights.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from madclip_runtime.errors import MadclipError

from .backbone import weights_fingerprint
from .config import ModelConfig, TrainConfig
from .model import MadCLIP, build_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
CONFIG = "config.json"


def trainable_state(model: MadCLIP) -> dict[str, torch.Tensor]:
    state = {f"adapters.{k}": v for k, v in model.adapters.state_dict().items()}
    state.update({f"prompts.ctx.{k}": v for k, v in model.prompts.ctx.items()})
    with torch.no_grad():
        t_n, t_ab = model.text_embeddings()
    state["text.t_n"], state["text.t_ab"] = t_n, t_ab
    return {k: v.detach().cpu().float().contiguous() for k, v in state.items()}


def checkpoint_bytes(model: MadCLIP, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(trainable_state(model), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_trainable_state(model: MadCLIP, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapters and ctx from `state` into `model` (strict: every trainable tensor must be present)."""
    expected = {f"adapters.{k}" for k in model.adapters.state_dict()} | {f"prompts.ctx.{k}" for k in model.prompts.ctx}
    missing = sorted(expected - set(state))
    if missing:
        raise MadclipError(f"{source}: checkpoint lacks {len(missing)} tensors (e.g. {missing[0]})")
    with torch.no_grad():
        for k, v in model.adapters.state_dict().items():
            src = state[f"adapters.{k}"]
            if src.shape != v.shape:
                raise MadclipError(f"{source}: adapters.{k} has shape {tuple(src.shape)}, model expects {tuple(v.shape)}")
            v.copy_(src)
        for k, p in model.prompts.ctx.items():
            src = state[f"prompts.ctx.{k}"]
            if src.shape != p.shape:
                raise MadclipError(f"{source}: prompts.ctx.{k} has shape {tuple(src.shape)}, model expects {tuple(p.shape)}")
            p.copy_(src)


def read_config(run_dir: str | Path) -> dict:
    """config.json of a run, checked (`validate_run_config`) so a missing or mistyped key is one line, not a KeyError."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise MadclipError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise MadclipError(f"{path}: missing (not a madclip run directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MadclipError(f"{path}: invalid JSON ({exc})") from None
    validate_run_config(config, str(path))
    return config


# key -> accepted types, for the `model` entry of config.json (what rebuilding the model reads).
_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "backbone": (str,), "pretrained": (str,), "image_size": (int,), "quick_gelu": (bool,),
    "causal_prompt_mask": (bool,), "objective": (str,), "n_ctx": (int,), "init_seed": (int,), "taps": (list,),
    "preprocess": (dict,),
}
_REQUIRED_MODEL_KEYS = ("backbone", "pretrained", "image_size", "objective")


def _type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def validate_run_config(config: object, where: str) -> None:
    """config.json must hold a `model` object with the keys the model is rebuilt from, of the right types."""
    if not isinstance(config, dict):
        raise MadclipError(f"{where}: expected a JSON object")
    model = config.get("model")
    if not isinstance(model, dict):
        raise MadclipError(f"{where}: key 'model' is missing or not an object (not a complete madclip run)")
    for key in _REQUIRED_MODEL_KEYS:
        if key not in model:
            raise MadclipError(f"{where}: key 'model.{key}' is missing")
    for key, types in _MODEL_KEYS.items():
        if key in model and not _type_ok(model[key], types):
            raise MadclipError(f"{where}: 'model.{key}' must be {'/'.join(t.__name__ for t in types)}, "
                               f"got {model[key]!r}")
    for key in ("train", "dataset"):
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            raise MadclipError(f"{where}: key '{key}' must be an object")
    try:
        ModelConfig.from_dict(model)
        TrainConfig.from_dict(config.get("train") or {})
    except (TypeError, ValueError) as exc:
        raise MadclipError(f"{where}: invalid model/train configuration ({exc})") from None


def check_finite_state(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a checkpoint holding NaN/inf (a diverged run): one line naming the first bad tensor."""
    bad = [k for k, v in sorted(state.items()) if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise MadclipError(f"{source}: {len(bad)} of {len(state)} tensors hold NaN or infinite values (e.g. {bad[0]}): "
                           f"the run diverged; retrain it (e.g. with a lower --lr)")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", check_weights: bool = True) -> tuple[MadCLIP, dict]:
    """Rebuild the trained model of a run directory. Loading executes no code (safetensors + JSON only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    mcfg = ModelConfig.from_dict(config["model"])
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise MadclipError(f"{ckpt}: missing")
    try:
        state = load_file(str(ckpt))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MadclipError(f"{ckpt}: unreadable safetensors file ({exc})") from None
    check_finite_state(state, str(ckpt))
    model = build_model(mcfg, seed=TrainConfig.from_dict(config.get("train") or {}).seed)
    expected = config.get("backbone_fingerprint")
    if check_weights and expected:
        got = weights_fingerprint(model.backbone.visual)
        if got != expected:
            raise MadclipError(f"{run_dir}: backbone weights ({mcfg.backbone}, {mcfg.pretrained}) differ from those "
                               f"the run was trained with (fingerprint {got[:12]} != {expected[:12]})")
    load_trainable_state(model, state, str(ckpt))
    model.to(device).eval()
    return model, config


# --- the authors' released checkpoints (METHOD.md section 10) -------------------------------------------------

_REF_HEADS = {"fc1": "fc1", "fc2": "det", "fc3": "seg"}


def convert_reference_state(ref: dict, n_layers: int = 4) -> dict[str, torch.Tensor]:
    """The reference's dict of state dicts -> our trainable-state names.

    `{normal,abnormal}_det_adapters.{j}.fc{1,2,3}.0.weight` -> `adapters.{normal,abnormal}.{j}.{fc1,det,seg}.weight`
    (fc2 is the det head, fc3 the seg head); `prompt_maker_{normal,abnormal}` `prompt_learner.ctx.{cls}_{pos}`
    -> `prompts.ctx.{cls}_{pos}`: the normal-class context is taken from prompt_maker_normal and the abnormal-class
    context from prompt_maker_abnormal when both makers hold both; the frozen text tower copy is ignored.
    """
    out: dict[str, torch.Tensor] = {}
    for branch in ("normal", "abnormal"):
        sd = ref.get(f"{branch}_det_adapters")
        if not isinstance(sd, dict):
            raise MadclipError(f"reference checkpoint lacks '{branch}_det_adapters'")
        for j in range(n_layers):
            for ref_name, ours in _REF_HEADS.items():
                key = f"{j}.{ref_name}.0.weight"
                if key not in sd:
                    raise MadclipError(f"reference checkpoint lacks {branch}_det_adapters.{key}")
                out[f"adapters.{branch}.{j}.{ours}.weight"] = sd[key].float()
    makers = {c: ref.get(f"prompt_maker_{c}") for c in ("normal", "abnormal")}
    for cls in ("normal", "abnormal"):
        for pos in ("end", "front", "middle"):
            key = f"prompt_learner.ctx.{cls}_{pos}"
            order = [makers[cls], makers["abnormal" if cls == "normal" else "normal"]]
            src = next((m[key] for m in order if isinstance(m, dict) and key in m), None)
            if src is None:
                raise MadclipError(f"reference checkpoint lacks {key} in prompt_maker_{cls}")
            out[f"prompts.ctx.{cls}_{pos}"] = src.float()
    return out


def load_reference_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a released .pth with torch.load(weights_only=True): tensors and plain containers only, never code."""
    try:
        ref = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MadclipError(f"{path}: no such file") from None
    except Exception as exc:  # pickle with code objects is refused by weights_only
        raise MadclipError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if not isinstance(ref, dict):
        raise MadclipError(f"{path}: expected a dict of state dicts, got {type(ref).__name__}")
    return convert_reference_state(ref)
