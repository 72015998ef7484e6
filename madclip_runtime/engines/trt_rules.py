"""Pure rules of the TensorRT paths: version boundaries, precision rules, engine keys, cache locations.

Nothing here imports tensorrt, cuda-python or onnxruntime, so every rule is unit-tested on any machine.

Version boundaries (each checked against the library's own code or documentation):
* TensorRT >= 10.12 (and 11, which has no FP16 builder flag): FP16 engines are built strongly typed from
  the mixed-precision `model_fp16.onnx`, so its FP32 islands are honoured as written. TensorRT 10.0-10.11
  (JetPack 6.1/6.2 ship 10.3) parse the FP32 `model.onnx`, set the FP16 builder flag and pin the FP32
  islands (`fp32_island`, `is_island_constant`) under obeyed precision constraints. TensorRT < 10 (JetPack 6.0 ships
  8.6) is refused.
* onnxruntime's TensorRT provider creates the network with NetworkDefinitionCreationFlag::kSTRONGLY_TYPED
  whenever trt_fp16_enable and trt_int8_enable are off (tensorrt_execution_provider.cc:
  `network_flags |= (fp16_enable_ || int8_enable_) ? 0 : kSTRONGLY_TYPED` for TensorRT > 8). That came
  with onnxruntime PR 19695 ("TRT detailed log and strong typed networks", merged April 2024), so it is in
  every onnxruntime this project supports (>= 1.20); the boundary is set at 1.18, the first release that
  can contain it. Below it the provider only has the blanket FP16 flag, and there LayerNorm is kept in FP32
  with the provider's trt_layer_norm_fp32_fallback option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..contract import FP16, FP32, INPUT_NAME, INT8, MODEL_FILES, ORT_TRT, SCORE
from ..errors import BackendUnavailable, BundleError, InputError

TRT_PRECISIONS = (FP32, FP16)
STRONGLY_TYPED_FROM = (10, 12)  # first TensorRT whose strongly typed FP16 path we use
ORT_TRT_STRONGLY_TYPED_FROM = (1, 18)  # onnxruntime PR 19695 (see the module docstring)
# Bump when a rule that changes the built engine changes (FP32 islands, tail, TF32, typing): cached engines
# built under older rules are then rebuilt instead of silently reused. 3: the FP16-flag tail is found from the
# island constants' layers as TensorRT's ONNX parser names them (and the IMatrixMultiplyLayer downcast).
RULES_VERSION = 3
# Forces the FP16 recipe: "flag" builds with the FP16 builder flag + pinned FP32 islands even on TensorRT
# 10.12-10.x (which offers both paths), so one GPU run proves the path JetPack's TensorRT 10.3 takes.
FP16_PATH_ENV = "MADCLIP_TRT_FP16_PATH"
FP16_PATHS = ("auto", "flag")


# ----------------------------------------------------------------------------------------------------------
# Versions and precisions
# ----------------------------------------------------------------------------------------------------------


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """'10.3.0.30' -> (10, 3, 0); '10.12' -> (10, 12, 0). Extra components (build numbers) are dropped."""
    match = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not match:
        raise BackendUnavailable(f"unrecognised TensorRT version string {version!r}")
    major, minor, patch = (int(g) if g is not None else 0 for g in match.groups())
    return major, minor, patch


def as_version(version: str | tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(version, str):
        return parse_trt_version(version)
    parts = tuple(int(v) for v in version) + (0, 0, 0)
    return parts[0], parts[1], parts[2]


def fp16_path() -> str:
    """The requested FP16 recipe, $MADCLIP_TRT_FP16_PATH: "auto" (default) or "flag" (see FP16_PATH_ENV)."""
    value = os.environ.get(FP16_PATH_ENV, "auto").strip().lower() or "auto"
    if value not in FP16_PATHS:
        raise BackendUnavailable(f"{FP16_PATH_ENV}={value!r}: expected one of {', '.join(FP16_PATHS)}")
    return value


def typing_mode(version: str | tuple[int, ...], path: str | None = None) -> str:
    """How an FP16 engine is built with this TensorRT: "strongly_typed" (>= 10.12, 11+) or "fp16_flag"
    (10.0-10.11, or 10.12-10.x when `path` (default: `fp16_path()`) is "flag"; 11 has no FP16 flag)."""
    v = as_version(version)
    if v[0] < 10:
        raise BackendUnavailable(f"TensorRT >= 10 required (found {v[0]}.{v[1]}.{v[2]})")
    wanted = path or fp16_path()
    if v[:2] < STRONGLY_TYPED_FROM:
        return "fp16_flag"
    if wanted == "flag":
        if v[0] >= 11:
            raise BackendUnavailable(f"{FP16_PATH_ENV}=flag: TensorRT {v[0]}.{v[1]} has no FP16 builder flag")
        return "fp16_flag"
    return "strongly_typed"


def builder_flags(typing: str) -> tuple[str, ...]:
    """The builder flags a recipe sets (+) or clears (-), by trt.BuilderFlag name; part of the engine key."""
    return {FP32: ("-TF32",), "fp16_flag": ("+FP16", "+OBEY_PRECISION_CONSTRAINTS"), "strongly_typed": ()}[
        typing
    ]


def check_trt_precision(precision: str) -> None:
    if precision not in TRT_PRECISIONS:
        hint = " (the int8 model is the CPU path: use the ort-cpu backend)" if precision == INT8 else ""
        raise BackendUnavailable(f"TensorRT engines are built for fp32 or fp16, not {precision!r}{hint}")


def onnx_variant(precision: str, version: str | tuple[int, ...], path: str | None = None) -> str:
    """Which bundle ONNX file TensorRT should parse: the mixed-precision file only for strongly typed FP16.

    Under the FP16 flag TensorRT re-decides every layer's precision anyway, so it parses the FP32 graph and
    the FP32 islands are pinned by the builder; strongly typed builds take the types written in the file.
    """
    check_trt_precision(precision)
    if precision == FP16 and typing_mode(version, path) == "strongly_typed":
        return MODEL_FILES[FP16]
    return MODEL_FILES[FP32]


def engine_typing(precision: str, version: str | tuple[int, ...], path: str | None = None) -> str:
    """What the engine's precision recipe is: "fp32" (TF32 off), "strongly_typed" or "fp16_flag"."""
    check_trt_precision(precision)
    return FP32 if precision == FP32 else typing_mode(version, path)


def tf32_allowed(precision: str) -> bool:
    """TF32 (on by default in TensorRT on Ampere and later) is cleared for fp32 engines: an "fp32" engine
    then computes in FP32 and matches the CPU within FP32 rounding. FP16 engines keep it (their FP32
    islands exist for range, which TF32 has)."""
    check_trt_precision(precision)
    return precision != FP32


def profile_shapes(
    input_shape_chw: tuple[int, int, int], max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) shapes of `image` for the optimisation profile: batch 1, 1 (latency) and max_batch."""
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    chw = tuple(int(d) for d in input_shape_chw)
    if len(chw) != 3 or any(d <= 0 for d in chw):
        raise BundleError(
            f"model input '{INPUT_NAME}' needs static [3, H, W] dims, got {list(input_shape_chw)}"
        )
    return (1, *chw), (1, *chw), (int(max_batch), *chw)


# ----------------------------------------------------------------------------------------------------------
# onnxruntime TensorRT provider
# ----------------------------------------------------------------------------------------------------------


def ort_trt_strongly_typed(ort_version: tuple[int, int]) -> bool:
    """The provider builds a strongly typed network when its FP16 flag is off (see the module docstring)."""
    return tuple(ort_version)[:2] >= ORT_TRT_STRONGLY_TYPED_FROM


def ort_trt_precision_options(precision: str, ort_version: tuple[int, int]) -> dict[str, bool]:
    """trt_fp16_enable / trt_layer_norm_fp32_fallback for the provider: FP16 from the mixed-precision ONNX
    through the strongly typed network where the provider has it; the blanket FP16 flag (with LayerNorm
    kept FP32) only where it does not."""
    if precision != FP16 or ort_trt_strongly_typed(ort_version):
        return {}
    return {"trt_fp16_enable": True, "trt_layer_norm_fp32_fallback": True}


# ----------------------------------------------------------------------------------------------------------
# Model identity and cache locations
# ----------------------------------------------------------------------------------------------------------


def content_id(part_sha256s: list[str]) -> str:
    """One id for a model from the sha256 of its files (graph, then external data if any): the weights
    decide it, not the file name. `file_sha256` computes the same id from the files themselves."""
    if not part_sha256s:
        raise ValueError("a model needs at least its graph file's sha256")
    if len(part_sha256s) == 1:
        return part_sha256s[0]  # no external data: the graph's own sha256 (what bundles already list)
    return hashlib.sha256("\n".join(part_sha256s).encode("ascii")).hexdigest()


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Content id of an ONNX file plus its external-data sibling (`model.onnx.data`) if there is one."""
    parts = [Path(path), Path(str(path) + ".data")]
    return content_id([_sha256_of(p) for p in parts if p.is_file()])


def cache_root() -> Path:
    """madclip's one cache directory: $MADCLIP_CACHE, else $XDG_CACHE_HOME/madclip, else ~/.cache/madclip.

    Engines live under engines/, training features under features/.
    """
    explicit = os.environ.get("MADCLIP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "madclip"


def engine_cache_dir() -> Path:
    return cache_root() / "engines"


def ort_trt_cache_dir(root: str | os.PathLike, model_id: str) -> Path:
    """onnxruntime's TensorRT engine/timing cache folder for ONE model: its cache id hashes names and
    versions, not weights, so two bundles of the same backbone must not share a folder."""
    return Path(root) / ORT_TRT / model_id[:16]


def _sm(compute_capability: tuple[int, int]) -> str:
    major, minor = compute_capability
    return f"sm{int(major)}{int(minor)}"


def timing_cache_path(cache_dir: str | os.PathLike, trt_version: str, sm: tuple[int, int]) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every engine built in `cache_dir`."""
    return Path(cache_dir) / f"timing_trt{trt_version}_{_sm(sm)}.cache"


# ----------------------------------------------------------------------------------------------------------
# Engine keys
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; stored as JSON beside it, and hashed into its file name. Any
    difference means: another file (so a shared cache dir never hands one model's engine to another)."""

    trt_version: str
    compute_capability: tuple[int, int]
    precision: str
    model_sha256: str  # content id of the ONNX graph + external data (`file_sha256` / `content_id`)
    max_batch: int = 8
    gpu_name: str = ""
    typing: str = ""  # `engine_typing`
    rules_version: int = RULES_VERSION
    # What else decides the built engine: the method's FP32-tail constants (bundle metadata `fp32_islands`;
    # they only change "fp16_flag" engines, recorded for every recipe so the key says what was asked for) and
    # the builder flags of the recipe (`builder_flags`), plus the workspace limit (it bounds tactic choice).
    fp32_islands: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    workspace_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_capability", tuple(int(v) for v in self.compute_capability))
        object.__setattr__(self, "fp32_islands", tuple(str(v) for v in self.fp32_islands))
        object.__setattr__(self, "builder_flags", tuple(str(v) for v in self.builder_flags))

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @property
    def file_name(self) -> str:
        """model_{precision}_trt{version}_sm{cc}_{key digest}.engine, e.g. model_fp16_trt10.3.0_sm87_1a2b....engine"""
        return f"model_{self.precision}_trt{self.trt_version}_{_sm(self.compute_capability)}_{self.digest[:16]}.engine"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineKey":
        data = json.loads(text)
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        if not isinstance(data, dict) or not required.issubset(data):
            raise ValueError("engine key JSON lacks fields")
        # A key written by an older madclip lacks the newer fields: their defaults make it a mismatch to
        # report ("precision rules version 2 -> 3"), not an unreadable sidecar.
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})

    def mismatches(self, other: "EngineKey") -> list[str]:
        """Human-readable differences `self -> other` (empty when the engine can be reused)."""
        labels = {
            "trt_version": "TensorRT",
            "compute_capability": "GPU compute capability",
            "precision": "precision",
            "model_sha256": "model sha256",
            "max_batch": "max batch",
            "gpu_name": "GPU",
            "typing": "typing",
            "rules_version": "precision rules version",
            "fp32_islands": "FP32 islands",
            "builder_flags": "builder flags",
            "workspace_bytes": "workspace bytes",
        }
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                if f.name == "model_sha256":
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


# ----------------------------------------------------------------------------------------------------------
# FP32 islands under the FP16 builder flag (TensorRT 10.0-10.11)
# ----------------------------------------------------------------------------------------------------------
# Which layers stay FP32, by TensorRT layer type (trt.LayerType name) and layer name (the ONNX node name,
# e.g. "/ln_1/LayerNormalization" from the TorchScript exporter or "node_linalg_vector_norm" from dynamo):
#   * NORMALIZATION, REDUCE, RESIZE: always (LayerNorm / the adapter standardisation, mean / L2 / max
#     reductions, the bilinear upsampling of the logits). FP16 LayerNorm after attention overflows.
#   * UNARY, ELEMENTWISE: pow, sqrt, reciprocal, and anything inside a normalisation (names with
#     "norm"/"ln"/"normalize"), i.e. the arithmetic of a decomposed LayerNorm or L2 normalisation; a "div"
#     only when its divisor is computed (an L2 norm), not a constant (GELU's / sqrt(2), attention scaling).
#   * MATRIX_MULTIPLY: only the scoring dot products (names with the tokens dt, score, logit); the builder
#     also keeps any matmul whose operand is a constant vector (`is_vector_shape`: the baked dt) in FP32.
#   * ACTIVATION: none by itself: a QuickGELU sigmoid in every block is fine in FP16. The head's sigmoid is
#     FP32 because it is in the tail.
#   * The tail: every layer downstream of the method's island constants (`is_island_constant`: the CONSTANT
#     layers the parser names after the initializers `dt`, MVFA's `text`/`one`, ...), followed through the
#     reshapes the parser inserts, i.e. the score head, as the FP16 ONNX conversion does
#     (madclip_export/fp16.py: head_nodes). Found by structure (layer names and data flow), never by tensor
#     names, which the parser does not give constants.
_ALWAYS_FP32_TYPES = frozenset({"NORMALIZATION", "REDUCE", "RESIZE"})
_ARITH_TYPES = frozenset({"UNARY", "ELEMENTWISE"})
_ARITH_KEYS = ("pow", "sqrt", "reciprocal", "norm", "normaliz")
_MATMUL_TOKENS = frozenset({"dt", SCORE, "logit", "logits"})
_NORM_SCOPE_TOKENS = frozenset({"ln", "norm", "layernorm"})


def _tokens(name: str) -> set[str]:
    return {t for t in re.split(r"[^0-9a-z]+", name.lower()) if t}


def fp32_island(layer_type_name: str, layer_name: str, constant_divisor: bool = False) -> bool:
    """True if this layer must stay FP32 when the FP16 builder flag is set (rule in the comment above).

    `constant_divisor`: the layer's second input is a constant (a "div" by a constant is not an island).
    """
    kind = layer_type_name.upper().removeprefix("LAYERTYPE.")
    name = layer_name.lower()
    tokens = _tokens(name)
    if kind in _ALWAYS_FP32_TYPES:
        return True
    if kind in _ARITH_TYPES:
        if any(k in name for k in _ARITH_KEYS) or bool(tokens & _NORM_SCOPE_TOKENS):
            return True
        return "div" in name and not constant_divisor
    if kind == "MATRIX_MULTIPLY":
        return bool(tokens & _MATMUL_TOKENS)
    return False


def is_island_constant(layer_name: str, constants: tuple[str, ...]) -> bool:
    """Is this CONSTANT layer one of the method's FP32-tail initializers (bundle metadata `fp32_islands`)?

    TensorRT's ONNX parser creates a constant layer for an initializer when a node first reads it as a tensor
    and names the LAYER after the initializer; its output tensor keeps TensorRT's default name
    ("(Unnamed Layer* N) [Constant]_output"). onnx-tensorrt importerUtils.cpp `convertToTensor`:
    `ctx->registerLayer(constantLayer, weights.getName(), nullptr)`; ImporterContext.cpp `registerLayer` sets
    the (uniquified) layer name only. The `_fp32island` copy is the one madclip_export/fp16.py makes when an
    island initializer is shared with FP16 nodes.
    """
    return layer_name in constants or any(layer_name == f"{c}_fp32island" for c in constants)


def is_vector_shape(shape: tuple[int, ...]) -> bool:
    """A matmul operand as the ONNX parser leaves a 1-D ONNX operand: [E] itself (kVECTOR), or [..., E, 1] /
    [..., 1, E] after it appended/prepended the unit axis and broadcast the rank with leading 1s
    (onnx-tensorrt onnxOpImporters.cpp MatMul: unsqueezeTensor(axes {1}) + broadcastTensors)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return dims[0] != 1
    if len(dims) < 2 or any(d != 1 for d in dims[:-2]):
        return False
    return (dims[-1] == 1) != (dims[-2] == 1)
