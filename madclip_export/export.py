"""madclip-export: run directory -> verified bundle (ONNX FP32, FP16, INT8, golden set, report, metadata).

Everything is written into a temporary sibling of BUNDLE and renamed into place at the end
(`AtomicDirectory`): a failed or interrupted export leaves nothing, and an existing bundle is replaced only
with `force`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from madclip_runtime.atomic import AtomicDirectory, atomic_writer
from madclip_runtime.bundles.bundle import write_metadata
from madclip_runtime.bundles.metadata_schema import OPSET_MAX, OPSET_MIN
from madclip_runtime.bundles.selftest import golden_decisions
from madclip_runtime.contract import (
    ANOMALY_MAP,
    FP16,
    FP32,
    GOLDEN_FILE,
    GOLDEN_INPUT,
    GOLDEN_LABELS,
    GOLDEN_SOURCES,
    INPUT_NAME,
    INT8,
    MODEL_FILES,
    OPENVINO,
    ORT_CPU,
    OUTPUT_NAMES,
    REPORT_FILE,
    SCORE,
    SCORE_MAP_MAX,
    io_metadata,
)
from madclip_runtime.engines.backends import create_backend
from madclip_runtime.errors import BackendUnavailable, MadclipError

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4


class ParityError(MadclipError):
    """An exported graph does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportOptions:
    run: str
    out: str
    fp16: bool = False
    int8: bool = False
    engine: bool = False
    max_batch: int = 8
    opset: int = 18
    triton: bool = False
    force: bool = False
    data: str | None = None  # dataset root override (where the run's shots and test images are)
    calib: str | None = None  # calibration/golden images: a dataset root, or a folder of images (unlabelled)
    calib_split: str = "valid"  # split of a --calib dataset root
    sign: str | None = None  # Ed25519 private key (PEM) to sign metadata.json with
    n_golden_shots: int = 8
    n_golden_test: int = 8
    fp32_tolerance: float = FP32_TOLERANCE


def _golden_samples(shots: list, root: str | None, n_shots: int, n_test: int) -> list:
    """A golden subset: some shots (normal first) plus a few test images of the dataset root when it has them."""
    from madclip_train.data import load_split

    normal = [s for s in shots if s.label == 0][: n_shots // 2]
    abnormal = [s for s in shots if s.label == 1][: n_shots - n_shots // 2]
    golden = normal + abnormal
    try:
        test = load_split(root or "", "test")
        for group in (test.normal, test.abnormal):
            pick = (
                np.linspace(0, len(group) - 1, min(len(group), n_test // 2)).round().astype(int)
                if group
                else []
            )
            golden += [group[i] for i in sorted(set(int(i) for i in pick))]
    except MadclipError as exc:
        log.info("no test images for the golden set (%s); using shots only", exc)
    return golden


@torch.no_grad()
def torch_outputs(model, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    outs: dict[str, list] = {k: [] for k in OUTPUT_NAMES}
    for i in range(0, len(images), batch):
        res = model(torch.from_numpy(images[i : i + batch]))
        for k in outs:
            outs[k].append(res[k].float().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def ort_outputs(path: Path, precision: str, images: np.ndarray, max_batch: int) -> tuple[dict, dict]:
    """Run a bundle graph with the runtime's own ORT CPU backend (FP16-safe options live there). Also B = 1."""
    backend = create_backend(ORT_CPU, str(path), precision, max_batch, None)
    try:
        t0 = time.perf_counter()
        full = backend.run(images)
        seconds = time.perf_counter() - t0
        single = backend.run(images[:1])
        return full, {
            "single": single,
            "seconds_per_image": seconds / len(images),
            "load_seconds": backend.load_seconds,
            "provider": backend.provider,
        }
    finally:
        backend.close()


def export_onnx(model, path: Path, max_batch: int, opset: int) -> None:
    """Dynamo export of the method's export module (which consumes `model`) with a dynamic batch 1..max_batch
    (example batch 2: batch 1 would bake the dimension)."""
    size = model.image_size
    module = model.export_module().eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    example = torch.rand(2, 3, size, size)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={INPUT_NAME: {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=n_bytes > 1_000_000_000,
        verbose=False,
    )
    from .openvino import rewrite_vector_matmuls

    rewrite_vector_matmuls(path)  # 1-D constant MatMuls as matrix-vector products: OpenVINO compiles them


def _model_files(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name == name or p.name.startswith(name + "."))


@dataclass
class ExportState:
    """What the export steps hand on: each step reads what earlier steps set and sets its own fields."""

    opts: ExportOptions
    progress: Callable[[str], None] = lambda s: None
    signing_key: Any = None
    t_start: float = 0.0
    tmp: Path | None = None  # the bundle being written (a temporary sibling of opts.out)
    report: dict = field(default_factory=dict)
    # load_run
    model: Any = None  # the PyTorch model (a MethodModel); dropped once exported
    config: dict = field(default_factory=dict)
    run_dir: Path | None = None
    spec: Any = None  # the run's PreprocessSpec
    method_meta: dict = field(default_factory=dict)
    shots: list = field(default_factory=list)
    golden: list = field(default_factory=list)
    has_masks_data: Any = None
    # pytorch_reference, calibrate, golden_reference
    shot_images: np.ndarray | None = None
    shot_masks: np.ndarray | None = None
    shot_labels: np.ndarray | None = None
    calibration_note: str | None = None
    shot_out: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    golden_images: np.ndarray | None = None
    golden_labels: np.ndarray | None = None
    torch_ref: dict = field(default_factory=dict)
    # export_fp32, fp32_parity, variants
    opset: int = 0
    fp32: dict = field(default_factory=dict)  # FP32 ONNX outputs on the golden images (variants' reference)
    models: dict = field(default_factory=dict)  # precision -> file name, for metadata.json
    extra_metadata: dict = field(default_factory=dict)  # entries a step adds to metadata.json

    def path(self, precision: str) -> Path:
        return self.tmp / MODEL_FILES[precision]


def prepare(opts: ExportOptions, progress: Callable[[str], None] = lambda s: None) -> ExportState:
    """Refuse bad options, a bad signing key and a missing TensorRT before any work."""
    check_options(opts)
    state = ExportState(
        opts=opts,
        progress=progress,
        t_start=time.perf_counter(),
        report={"run": str(opts.run), "variants": {}},
    )
    if opts.sign is not None:
        from madclip_runtime.bundles.signing import load_private_key

        state.signing_key = load_private_key(opts.sign)  # a bad key fails before minutes of export
    if opts.engine:
        _require_tensorrt()
    return state


def load_run_step(st: ExportState) -> None:
    """The run's model (eval mode), config, calibration/golden samples and the method's metadata."""
    from madclip_train.rundir import load_run

    st.progress("loading the run")
    st.model, st.config = load_run(st.opts.run)
    st.model.eval()
    st.run_dir = Path(st.opts.run)
    st.shots, st.golden, st.has_masks_data = _calibration_samples(st.opts, st.config, st.run_dir)
    st.spec = st.model.cfg.preprocess
    m = st.model
    st.method_meta = {
        "method": m.name,
        "ranges": m.output_ranges(),
        "meanings": m.output_meanings(),
        "provenance": m.provenance(),
        "fp32_islands": m.fp32_island_constants,
    }


def pytorch_reference_step(st: ExportState) -> None:
    """The calibration images (the method may add to them) and the PyTorch FP32 outputs on them."""
    from madclip_train.data import load_arrays

    st.progress(f"PyTorch FP32 reference on {len(st.shots)} shots")
    images, masks, labels = load_arrays(st.shots, st.spec)
    seed = int(st.config.get("train", {}).get("seed") or 0)
    st.shot_images, st.shot_masks, st.shot_labels, st.calibration_note = st.model.calibration_set(
        images, masks, labels, seed
    )
    st.shot_out = torch_outputs(st.model, st.shot_images)


def calibrate_step(st: ExportState) -> None:
    """Decision and map thresholds from the calibration outputs (`calibrate.py`)."""
    from .calibrate import calibrate

    out, opts = st.shot_out, st.opts
    has_masks = bool(st.has_masks_data) and bool(st.shot_masks.any())
    st.calibration = calibrate(
        out[SCORE],
        out[SCORE_MAP_MAX],
        out[ANOMALY_MAP][:, 0],
        st.shot_masks,
        st.shot_labels,
        st.method_meta["ranges"][ANOMALY_MAP],
        has_masks,
    )
    if opts.calib is not None and st.calibration["threshold"] is not None:
        st.calibration["method"] = (
            f"Youden's J maximised over midpoints of the image scores of {len(st.shots)} labelled "
            f"--calib images ({opts.calib}, split {opts.calib_split}); check it on held-out data"
        )
    if st.calibration_note:
        st.calibration["method"] += f"; {st.calibration_note}"


def golden_reference_step(st: ExportState) -> None:
    """The golden images and their PyTorch FP32 outputs (the parity reference and golden.npz)."""
    from madclip_train.data import load_arrays

    st.golden_images, _, st.golden_labels = load_arrays(st.golden, st.spec)
    st.torch_ref = torch_outputs(st.model, st.golden_images)


def export_fp32_step(st: ExportState) -> None:
    """The FP32 ONNX graph (consumes the model) and the opset it was written with."""
    st.progress(
        f"exporting the FP32 ONNX graph ({st.model.title}: text side baked as constants, FP32 tail "
        f"from {', '.join(st.model.fp32_island_constants)}; backbone truncated; about a minute on a CPU)"
    )
    t0 = time.perf_counter()
    export_onnx(st.model, st.path(FP32), st.opts.max_batch, st.opts.opset)
    st.opset = written_opset(st.path(FP32), st.opts.opset)
    st.report["export_seconds"] = round(time.perf_counter() - t0, 2)
    st.model = None


def fp32_parity_step(st: ExportState) -> None:
    """The FP32 graph against PyTorch on the golden set (batch and batch 1): no bundle beyond tolerance."""
    from .parity import diff_stats, variant_report

    st.progress("ORT CPU FP32 parity")
    st.fp32, info = ort_outputs(st.path(FP32), FP32, st.golden_images, st.opts.max_batch)
    parity = diff_stats(st.torch_ref, st.fp32)
    parity_b1 = diff_stats({k: v[:1] for k, v in st.torch_ref.items()}, info["single"])
    st.report["variants"][FP32] = {
        "vs_pytorch": parity,
        "vs_pytorch_batch1": parity_b1,
        "seconds_per_image_cpu": info["seconds_per_image"],
        **variant_report(st.torch_ref, st.fp32, st.golden_labels, st.calibration),
    }
    worst_score = max(parity[SCORE]["max_abs"], parity_b1[SCORE]["max_abs"])
    worst_map = max(parity[ANOMALY_MAP]["p99_abs"], parity_b1[ANOMALY_MAP]["p99_abs"])
    tol = st.opts.fp32_tolerance
    if not (worst_score <= tol and worst_map <= tol):
        raise ParityError(
            f"FP32 ONNX parity failed: score max abs {worst_score:.2e}, anomaly_map p99 "
            f"{worst_map:.2e} (tolerance {tol:.0e}); no bundle written"
        )
    st.models = {FP32: MODEL_FILES[FP32]}


def fp16_step(st: ExportState) -> None:
    """--fp16: the mixed-precision graph (the method's FP32 islands) and its parity with the FP32 graph."""
    import onnx

    from .fp16 import to_mixed_fp16

    if not st.opts.fp16:
        return
    st.progress("converting to mixed-precision FP16 (FP32 islands)")
    graph = to_mixed_fp16(onnx.load(str(st.path(FP32))), st.method_meta["fp32_islands"])
    onnx.save(graph, str(st.path(FP16)))
    del graph
    st.progress("ORT CPU FP16 parity (ORT_ENABLE_EXTENDED: the FP16 CPU segfault is avoided)")
    got, _ = ort_outputs(st.path(FP16), FP16, st.golden_images, st.opts.max_batch)
    _variant(st, FP16, got)
    st.models[FP16] = MODEL_FILES[FP16]


def engine_step(st: ExportState) -> None:
    """--fp16: warm this machine's TensorRT engine cache (`_maybe_build_engine`)."""
    if st.opts.fp16:
        st.report["tensorrt"] = _maybe_build_engine(
            st.tmp, st.opts, st.progress, tuple(st.method_meta["fp32_islands"])
        )


def int8_step(st: ExportState) -> None:
    """--int8: dynamic INT8 (s8 weights; the method's FP32 tail not quantised) and its parity with FP32."""
    from .int8 import quantize_int8

    if not st.opts.int8:
        return
    st.progress("quantising to dynamic INT8 (s8 weights)")
    quantize_int8(st.path(FP32), st.path(INT8), tuple(st.method_meta["fp32_islands"]))
    got, info8 = ort_outputs(st.path(INT8), INT8, st.golden_images, st.opts.max_batch)
    _variant(st, INT8, got, seconds_per_image_cpu=info8["seconds_per_image"])
    st.models[INT8] = MODEL_FILES[INT8]


def openvino_step(st: ExportState) -> None:
    """OpenVINO (when installed): FP32/BF16 parity and, with --int8, the NNCF INT8 IR (`.openvino`)."""
    from .openvino import openvino_variants

    st.progress("OpenVINO: FP32/BF16 parity" + (", NNCF INT8 IR" if st.opts.int8 else ""))
    st.report[OPENVINO], ov_meta = openvino_variants(
        st.tmp,
        st.torch_ref,
        st.fp32,
        st.golden_images,
        st.golden_labels,
        st.calibration,
        st.shot_images,
        st.method_meta["fp32_islands"],
        st.opts.max_batch,
        st.opts.int8,
    )
    st.extra_metadata.update(ov_meta)


def _variant(st: ExportState, precision: str, got: dict, **extra) -> None:
    """A variant's report entry (against the FP32 graph and PyTorch); non-finite outputs refuse the bundle."""
    from .parity import diff_stats, variant_report

    st.report["variants"][precision] = {
        **variant_report(st.fp32, got, st.golden_labels, st.calibration),
        "vs_pytorch": diff_stats(st.torch_ref, got),
        "reference": "onnx fp32",
        **extra,
    }
    _check_finite(st.report["variants"][precision], precision.upper())


def triton_step(st: ExportState) -> None:
    """--triton: a Triton Inference Server model repository beside the graphs."""
    if not st.opts.triton:
        return
    st.progress("writing the Triton model repository")
    from .triton import write_triton_repository

    repo = write_triton_repository(
        st.tmp, _model_files(st.tmp, MODEL_FILES[FP32]), st.spec.image_size, st.opts.max_batch
    )
    st.report["triton"] = str(repo.relative_to(st.tmp))


def write_bundle_step(st: ExportState) -> None:
    """golden.npz (inputs, labels, sources, FP32 reference, decisions), the report, metadata.json (signed)."""
    st.progress("writing golden set, report and metadata")
    tmp = st.tmp
    with atomic_writer(tmp / GOLDEN_FILE) as f:
        np.savez_compressed(
            f,
            **{
                GOLDEN_INPUT: st.golden_images,
                GOLDEN_LABELS: st.golden_labels.astype(np.int64),
                GOLDEN_SOURCES: np.array([str(Path(s.path).name) for s in st.golden]),
            },
            **st.torch_ref,
            **golden_decisions(st.torch_ref, st.calibration),
        )
    st.report["sizes_bytes"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
    st.report["calibration"] = st.calibration
    st.report["seconds"] = round(time.perf_counter() - st.t_start, 2)
    (tmp / REPORT_FILE).write_text(json.dumps(st.report, indent=2) + "\n")
    meta = _metadata(
        st.config, st.spec, st.method_meta, st.opts, st.calibration, st.models, st.run_dir, st.opset
    )
    write_metadata(tmp, {**meta, **st.extra_metadata}, signing_key=st.signing_key)


# The export, in order. A step that does not apply to the options (fp16_step without --fp16) returns at once.
STEPS: tuple[Callable[[ExportState], None], ...] = (
    load_run_step,
    pytorch_reference_step,
    calibrate_step,
    golden_reference_step,
    export_fp32_step,
    fp32_parity_step,
    fp16_step,
    engine_step,
    int8_step,
    openvino_step,
    triton_step,
    write_bundle_step,
)


def export_bundle(opts: ExportOptions, step: Callable[[str], None] = lambda s: None) -> dict:
    """Export, verify and write the bundle. Returns the export report (also written to export_report.json)."""
    state = prepare(opts, step)
    with AtomicDirectory(opts.out, force=opts.force) as tmp:
        state.tmp = Path(tmp)
        for run_step in STEPS:
            run_step(state)
    return state.report


def check_options(opts: ExportOptions) -> None:
    """Refuse bad options before any work (the CLI's argparse types check the same for command lines)."""
    if not 1 <= opts.max_batch <= 4096:
        raise MadclipError(f"--max-batch must be in [1, 4096] (got {opts.max_batch})")
    if not OPSET_MIN <= opts.opset <= OPSET_MAX:
        raise MadclipError(
            f"--opset must be in [{OPSET_MIN}, {OPSET_MAX}] (the opsets the exporter writes), "
            f"got {opts.opset}"
        )
    if opts.calib_split not in ("valid", "test"):
        raise MadclipError(f"--calib-split must be valid or test (got {opts.calib_split!r})")
    for n in (opts.n_golden_shots, opts.n_golden_test):
        if n < 0:
            raise MadclipError(f"golden set sizes must be >= 0 (got {n})")
    if not np.isfinite(opts.fp32_tolerance):
        raise MadclipError(f"fp32 tolerance must be a finite number (got {opts.fp32_tolerance})")


def written_opset(path: Path, requested: int) -> int:
    """The default-domain opset of the graph as written (read back from the file); it must be the requested one."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise MadclipError(f"{path}: the exported graph declares no ai.onnx opset")
    if versions[0] != requested:
        raise MadclipError(
            f"--opset {requested}: the exporter wrote opset {versions[0]} instead; no bundle written "
            f"(use an opset in [{OPSET_MIN}, {OPSET_MAX}])"
        )
    return int(versions[0])


def _calibration_samples(opts: ExportOptions, config: dict, run_dir: Path):
    """(calibration samples, golden samples, has masks): from --calib when given, else the run's shots."""
    if opts.calib is not None:
        from .calib_source import calib_samples

        return calib_samples(opts.calib, opts.calib_split, opts.n_golden_shots + opts.n_golden_test)
    from madclip_train.rundir import read_shots

    shots = read_shots(run_dir, config, opts.data)
    if not shots:
        raise MadclipError(
            f"{run_dir}: the run lists no shot images (e.g. a converted reference checkpoint): pass "
            f"--calib DIR (a dataset root with normal and abnormal images, --calib-split valid|test, "
            f"or a folder of images) for calibration and the golden set"
        )
    golden = _golden_samples(
        shots, opts.data or (config.get("dataset") or {}).get("root"), opts.n_golden_shots, opts.n_golden_test
    )
    return shots, golden, (config.get("dataset") or {}).get("has_masks")


def _check_finite(variant: dict, name: str) -> None:
    if any(not np.isfinite(v["max_abs"]) for v in variant["errors"].values()):
        raise ParityError(f"{name} graph produced non-finite outputs on the golden set; no bundle written")


def _require_tensorrt() -> None:
    from madclip_runtime.engines import backends

    backends.require_trt()  # raises BackendUnavailable with a one-line message


def _maybe_build_engine(tmp: Path, opts: ExportOptions, step, fp32_islands: tuple[str, ...]) -> dict:
    """Warm THIS machine's TensorRT engine cache; the engine is never put in the bundle.

    An engine only runs on the TensorRT version and GPU that built it, and the runtime looks engines up in
    its cache by key (model content id, TensorRT, GPU, recipe): building through the runtime's own
    `backends.prebuild_trt_engine` makes the first `madclip-infer --backend trt` on this machine load it
    in seconds; other machines build their own on first use.
    """
    from madclip_runtime.engines import backends

    try:
        backends.require_trt()
    except BackendUnavailable as exc:
        if opts.engine:
            raise
        msg = (
            f"TensorRT engine not built here ({str(exc).splitlines()[0]}): madclip-infer --backend trt builds it "
            f"on the target on first use"
        )
        log.debug(msg)  # the CLI prints the reason once, after the report table
        return {"built": False, "reason": msg}
    step("building the TensorRT FP16 engine into this machine's engine cache (minutes)")
    try:
        path, version = backends.prebuild_trt_engine(tmp, FP16, opts.max_batch, fp32_islands=fp32_islands)
    except Exception as exc:  # noqa: BLE001 (TensorRT raises RuntimeError too; the engine is optional)
        if opts.engine:
            raise
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        msg = (
            f"TensorRT engine build failed here ({exc.__class__.__name__}: {first}); the bundle is written "
            f"without it, madclip-infer --backend trt retries on first use"
        )
        log.warning(msg)
        return {"built": False, "reason": msg}
    return {"built": True, "in_bundle": False, "cached_engine": str(path), "tensorrt": version}


def _metadata(
    config: dict,
    spec,
    method_meta: dict,
    opts: ExportOptions,
    calibration: dict,
    models: dict,
    run_dir: Path,
    opset: int,
) -> dict:
    import onnx
    import onnxruntime
    import open_clip

    mcfg = config["model"]
    return {
        "method": method_meta["method"],
        "fp32_islands": list(method_meta["fp32_islands"]),
        "preprocess": spec.to_dict(),
        **io_metadata(spec.image_size, method_meta["ranges"], method_meta["meanings"]),
        "max_batch": opts.max_batch,
        "opset": opset,  # read back from the written graph
        "calibration": calibration,
        "models": models,
        "provenance": {
            "method": method_meta["method"],
            "backbone": mcfg["backbone"],
            "pretrained": mcfg["pretrained"],
            "taps": mcfg["taps"],
            "quick_gelu": mcfg["quick_gelu"],
            "normalize": spec.normalize,
            **method_meta["provenance"],
            "shots": (config.get("train") or {}).get("shots"),
            "seed": (config.get("train") or {}).get("seed"),
            "calibration_images": opts.calib,
            "converted_from": config.get("converted_from"),
            "run_dir": str(run_dir.resolve()),
            "backbone_fingerprint": config.get("backbone_fingerprint"),
            "versions": {
                **config.get("versions", {}),
                "torch_export": torch.__version__,
                "open_clip_export": open_clip.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
        },
    }
