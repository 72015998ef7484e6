"""madclip-export: run directory -> verified bundle (ONNX FP32, FP16, INT8, golden set, report, metadata).

Everything is written into a temporary sibling of BUNDLE and renamed into place at the end
(`AtomicDirectory`): a failed or interrupted export leaves nothing, and an existing bundle is replaced only
with `force`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from madclip_runtime.atomic import AtomicDirectory, atomic_writer
from madclip_runtime.engines.backends import create_backend
from madclip_runtime.bundles.bundle import write_metadata
from madclip_runtime.contract import (GOLDEN_FILE, GOLDEN_INPUT, GOLDEN_LABELS, GOLDEN_SOURCES, INPUT_NAME, MODEL_FILES,
                                      OUTPUT_NAMES, REPORT_FILE, io_metadata)
from madclip_runtime.errors import BackendUnavailable, MadclipError
from madclip_runtime.bundles.metadata_schema import OPSET_MAX, OPSET_MIN
from madclip_runtime.bundles.selftest import golden_decisions

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
            pick = np.linspace(0, len(group) - 1, min(len(group), n_test // 2)).round().astype(int) if group else []
            golden += [group[i] for i in sorted(set(int(i) for i in pick))]
    except MadclipError as exc:
        log.info("no test images for the golden set (%s); using shots only", exc)
    return golden


@torch.no_grad()
def _torch_outputs(model, images: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    outs: dict[str, list] = {k: [] for k in OUTPUT_NAMES}
    for i in range(0, len(images), batch):
        res = model(torch.from_numpy(images[i:i + batch]))
        for k in outs:
            outs[k].append(res[k].float().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _ort_outputs(path: Path, precision: str, images: np.ndarray, max_batch: int) -> tuple[dict, dict]:
    """Run a bundle graph with the runtime's own ORT CPU backend (FP16-safe options live there). Also B = 1."""
    backend = create_backend("ort-cpu", str(path), precision, max_batch, None)
    try:
        t0 = time.perf_counter()
        full = backend.run(images)
        seconds = time.perf_counter() - t0
        single = backend.run(images[:1])
        return full, {"single": single, "seconds_per_image": seconds / len(images), "load_seconds": backend.load_seconds,
                      "provider": backend.provider}
    finally:
        backend.close()


def export_onnx(model, path: Path, max_batch: int, opset: int) -> None:
    """Dynamo export of the method's export module (which consumes `model`) with a dynamic batch 1..max_batch
    (example batch 2: batch 1 would bake the dimension)."""
    size = model.image_size
    module = model.export_module().eval()
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    example = torch.rand(2, 3, size, size)
    torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                      dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True,
                      external_data=n_bytes > 1_000_000_000, verbose=False)
    from .openvino import rewrite_vector_matmuls

    rewrite_vector_matmuls(path)  # 1-D constant MatMuls as matrix-vector products: OpenVINO compiles them


def _model_files(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name == name or p.name.startswith(name + "."))


def export_bundle(opts: ExportOptions, step: Callable[[str], None] = lambda s: None) -> dict:
    """Export, verify and write the bundle. Returns the export report (also written to export_report.json)."""
    import onnx

    from madclip_train.data import load_arrays
    from madclip_train.rundir import load_run

    from .calibrate import calibrate
    from .fp16 import to_mixed_fp16
    from .int8 import quantize_int8
    from .parity import diff_stats, variant_report

    check_options(opts)
    signing_key = None
    if opts.sign is not None:
        from madclip_runtime.bundles.signing import load_private_key

        signing_key = load_private_key(opts.sign)  # a bad key fails before minutes of export
    if opts.engine:
        _require_tensorrt()
    t_start = time.perf_counter()
    report: dict = {"run": str(opts.run), "variants": {}}
    with AtomicDirectory(opts.out, force=opts.force) as tmp:
        tmp = Path(tmp)
        step("loading the run")
        model, config = load_run(opts.run)
        model.eval()
        run_dir = Path(opts.run)
        shots, golden, has_masks_data = _calibration_samples(opts, config, run_dir)
        spec = model.cfg.preprocess
        ranges = model.output_ranges()
        method_meta = {"method": model.name, "ranges": ranges, "meanings": model.output_meanings(),
                       "provenance": model.provenance(), "fp32_islands": model.fp32_island_constants}

        step(f"PyTorch FP32 reference on {len(shots)} shots")
        shot_images, shot_masks, shot_labels = load_arrays(shots, spec)
        shot_images, shot_masks, shot_labels, calibration_note = model.calibration_set(
            shot_images, shot_masks, shot_labels, int(config.get("train", {}).get("seed") or 0))
        shot_out = _torch_outputs(model, shot_images)
        has_masks = bool(has_masks_data) and bool(shot_masks.any())
        calibration = calibrate(shot_out["score"], shot_out["score_map_max"], shot_out["anomaly_map"][:, 0],
                                shot_masks, shot_labels, ranges["anomaly_map"], has_masks)
        if opts.calib is not None and calibration["threshold"] is not None:
            calibration["method"] = (f"Youden's J maximised over midpoints of the image scores of {len(shots)} labelled "
                                     f"--calib images ({opts.calib}, split {opts.calib_split}); check it on held-out data")
        if calibration_note:
            calibration["method"] += f"; {calibration_note}"
        golden_images, _, golden_labels = load_arrays(golden, spec)
        torch_ref = _torch_outputs(model, golden_images)

        step(f"exporting the FP32 ONNX graph ({model.title}: text side baked as constants, FP32 tail from "
             f"{', '.join(model.fp32_island_constants)}; backbone truncated; about a minute on a CPU)")
        t0 = time.perf_counter()
        export_onnx(model, tmp / MODEL_FILES["fp32"], opts.max_batch, opts.opset)
        opset = written_opset(tmp / MODEL_FILES["fp32"], opts.opset)
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        del model

        step("ORT CPU FP32 parity")
        fp32, info = _ort_outputs(tmp / MODEL_FILES["fp32"], "fp32", golden_images, opts.max_batch)
        parity = diff_stats(torch_ref, fp32)
        parity_b1 = diff_stats({k: v[:1] for k, v in torch_ref.items()}, info["single"])
        report["variants"]["fp32"] = {"vs_pytorch": parity, "vs_pytorch_batch1": parity_b1,
                                      "seconds_per_image_cpu": info["seconds_per_image"],
                                      **variant_report(torch_ref, fp32, golden_labels, calibration)}
        worst_score = max(parity["score"]["max_abs"], parity_b1["score"]["max_abs"])
        worst_map = max(parity["anomaly_map"]["p99_abs"], parity_b1["anomaly_map"]["p99_abs"])
        if not (worst_score <= opts.fp32_tolerance and worst_map <= opts.fp32_tolerance):
            raise ParityError(f"FP32 ONNX parity failed: score max abs {worst_score:.2e}, anomaly_map p99 "
                              f"{worst_map:.2e} (tolerance {opts.fp32_tolerance:.0e}); no bundle written")
        models = {"fp32": MODEL_FILES["fp32"]}

        if opts.fp16:
            step("converting to mixed-precision FP16 (FP32 islands)")
            graph = to_mixed_fp16(onnx.load(str(tmp / MODEL_FILES["fp32"])), method_meta["fp32_islands"])
            onnx.save(graph, str(tmp / MODEL_FILES["fp16"]))
            del graph
            step("ORT CPU FP16 parity (ORT_ENABLE_EXTENDED: the FP16 CPU segfault is avoided)")
            got, _ = _ort_outputs(tmp / MODEL_FILES["fp16"], "fp16", golden_images, opts.max_batch)
            report["variants"]["fp16"] = {**variant_report(fp32, got, golden_labels, calibration),
                                          "vs_pytorch": diff_stats(torch_ref, got), "reference": "onnx fp32"}
            _check_finite(report["variants"]["fp16"], "FP16")
            models["fp16"] = MODEL_FILES["fp16"]
            report["tensorrt"] = _maybe_build_engine(tmp, opts, step, tuple(method_meta["fp32_islands"]))

        if opts.int8:
            step("quantising to dynamic INT8 (s8 weights)")
            quantize_int8(tmp / MODEL_FILES["fp32"], tmp / MODEL_FILES["int8"])
            got, info8 = _ort_outputs(tmp / MODEL_FILES["int8"], "int8", golden_images, opts.max_batch)
            report["variants"]["int8"] = {**variant_report(fp32, got, golden_labels, calibration),
                                          "vs_pytorch": diff_stats(torch_ref, got), "reference": "onnx fp32",
                                          "seconds_per_image_cpu": info8["seconds_per_image"]}
            _check_finite(report["variants"]["int8"], "INT8")
            models["int8"] = MODEL_FILES["int8"]

        step("OpenVINO: FP32/BF16 parity" + (", NNCF INT8 IR" if opts.int8 else ""))
        from .openvino import openvino_variants

        report["openvino"], ov_meta = openvino_variants(
            tmp, torch_ref, fp32, golden_images, golden_labels, calibration, shot_images,
            method_meta["fp32_islands"], opts.max_batch, opts.int8)

        if opts.triton:
            step("writing the Triton model repository")
            from .triton import write_triton_repository

            repo = write_triton_repository(tmp, _model_files(tmp, MODEL_FILES["fp32"]), spec.image_size, opts.max_batch)
            report["triton"] = str(repo.relative_to(tmp))

        step("writing golden set, report and metadata")
        with atomic_writer(tmp / GOLDEN_FILE) as f:
            np.savez_compressed(f, **{GOLDEN_INPUT: golden_images, GOLDEN_LABELS: golden_labels.astype(np.int64),
                                      GOLDEN_SOURCES: np.array([str(Path(s.path).name) for s in golden])},
                                **torch_ref, **golden_decisions(torch_ref, calibration))
        report["sizes_bytes"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        report["calibration"] = calibration
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        meta = _metadata(config, spec, method_meta, opts, calibration, models, run_dir, opset)
        write_metadata(tmp, {**meta, **ov_meta}, signing_key=signing_key)
    return report


def check_options(opts: ExportOptions) -> None:
    """Refuse bad options before any work (the CLI's argparse types check the same for command lines)."""
    if not 1 <= opts.max_batch <= 4096:
        raise MadclipError(f"--max-batch must be in [1, 4096] (got {opts.max_batch})")
    if not OPSET_MIN <= opts.opset <= OPSET_MAX:
        raise MadclipError(f"--opset must be in [{OPSET_MIN}, {OPSET_MAX}] (the opsets the exporter writes), "
                           f"got {opts.opset}")
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
        raise MadclipError(f"--opset {requested}: the exporter wrote opset {versions[0]} instead; no bundle written "
                           f"(use an opset in [{OPSET_MIN}, {OPSET_MAX}])")
    return int(versions[0])


def _calibration_samples(opts: ExportOptions, config: dict, run_dir: Path):
    """(calibration samples, golden samples, has masks): from --calib when given, else the run's shots."""
    if opts.calib is not None:
        from .calib_source import calib_samples

        return calib_samples(opts.calib, opts.calib_split, opts.n_golden_shots + opts.n_golden_test)
    from madclip_train.rundir import read_shots

    shots = read_shots(run_dir, config, opts.data)
    if not shots:
        raise MadclipError(f"{run_dir}: the run lists no shot images (e.g. a converted reference checkpoint): pass "
                           f"--calib DIR (a dataset root with normal and abnormal images, --calib-split valid|test, "
                           f"or a folder of images) for calibration and the golden set")
    golden = _golden_samples(shots, opts.data or (config.get("dataset") or {}).get("root"), opts.n_golden_shots,
                             opts.n_golden_test)
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
        msg = (f"TensorRT engine not built here ({str(exc).splitlines()[0]}): madclip-infer --backend trt builds it "
               f"on the target on first use")
        log.debug(msg)  # the CLI prints the reason once, after the report table
        return {"built": False, "reason": msg}
    step("building the TensorRT FP16 engine into this machine's engine cache (minutes)")
    try:
        path, version = backends.prebuild_trt_engine(tmp, "fp16", opts.max_batch, fp32_islands=fp32_islands)
    except Exception as exc:  # noqa: BLE001 (TensorRT raises RuntimeError too; the engine is optional)
        if opts.engine:
            raise
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        msg = (f"TensorRT engine build failed here ({exc.__class__.__name__}: {first}); the bundle is written "
               f"without it, madclip-infer --backend trt retries on first use")
        log.warning(msg)
        return {"built": False, "reason": msg}
    return {"built": True, "in_bundle": False, "cached_engine": str(path), "tensorrt": version}


def _metadata(config: dict, spec, method_meta: dict, opts: ExportOptions, calibration: dict, models: dict,
              run_dir: Path, opset: int) -> dict:
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
            "method": method_meta["method"], "backbone": mcfg["backbone"], "pretrained": mcfg["pretrained"],
            "taps": mcfg["taps"], "quick_gelu": mcfg["quick_gelu"], "normalize": spec.normalize,
            **method_meta["provenance"],
            "shots": (config.get("train") or {}).get("shots"), "seed": (config.get("train") or {}).get("seed"),
            "calibration_images": opts.calib, "converted_from": config.get("converted_from"),
            "run_dir": str(run_dir.resolve()), "backbone_fingerprint": config.get("backbone_fingerprint"),
            "versions": {**config.get("versions", {}), "torch_export": torch.__version__,
                         "open_clip_export": open_clip.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        },
    }
