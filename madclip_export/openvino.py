"""OpenVINO at export: the graph rewrite that lets OpenVINO compile every method, and the NNCF INT8 IR.

Why the rewrite: MadCLIP's head scores each patch with a MatMul against a 1-D constant (the baked text
difference `dt`: `[4, B, 289, 32] x [32] -> [4, B, 289]`) followed by a negation. OpenVINO 2026.4's CPU
plugin turns the negation into a Multiply by -1 and its `MatMulMultiplyFusion` pass folds that scalar into
the constant: for a 1-D right-hand side the folded constant comes out as [1, 1, 32], which no longer matches
the MatMul's contraction dimension, and compilation fails ("Incompatible MatMul matrix dimension"). The same
product written as `[.., 32] x [32, 1]` followed by `Squeeze(-1)` is the textbook matrix-vector form the
pass handles; it computes the same dot products, so ONNX Runtime's FP32 outputs stay bit-identical
(tests/test_openvino.py). MediCLIP has the same 1-D MatMuls but no Multiply after them (an Unsqueeze), and
MVFA has none; the rewrite is applied to every exported graph so no method depends on which passes fire.

INT8: NNCF post-training quantization (static activations, 8-bit weights) of the FP32 graph read by
OpenVINO, calibrated on the export's calibration images, with the method's FP32 tail (every node from the
consumers of `fp32_islands` on, `openvino_engine.head_node_names`) in NNCF's ignored scope; saved as IR
(`model_int8_ov.xml` + `.bin`, `contract.OPENVINO_MODEL_FILES`), listed in the bundle's files (sha256),
sealed and signed with the rest of metadata.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from madclip_runtime.contract import BF16, FP32, INT8, OPENVINO
from madclip_runtime.errors import MadclipError

log = logging.getLogger(__name__)


class OpenVinoParityError(MadclipError):
    """An OpenVINO variant does not compute what the FP32 graph computes."""


def rewrite_vector_matmuls(path: str | os.PathLike) -> int:
    """Rewrite every `MatMul(X, c)` with a 1-D initializer `c` [K] as `Squeeze(MatMul(X, c[K, 1]), -1)`, in
    place (atomically). Returns the number of MatMuls rewritten.

    The initializer keeps its name (the method's `fp32_islands` name it) and only its dims change when every
    consumer is such a MatMul (a [K] and a [K, 1] tensor have the same bytes, so external data is untouched);
    otherwise an Unsqueeze node makes the column and the original stays for its other consumers.
    """
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    targets = [
        n
        for n in graph.node
        if n.op_type == "MatMul"
        and len(n.input) == 2
        and n.input[1] in inits
        and len(inits[n.input[1]].dims) == 1
    ]
    if not targets:
        return 0
    new_nodes: list = []
    columns: dict[str, str] = {}
    for name in sorted({n.input[1] for n in targets}):
        only_matmuls = all(
            c.op_type == "MatMul" and list(c.input).index(name) == 1 and c in targets for c in consumers[name]
        )
        only_matmuls = only_matmuls and not any(o.name == name for o in graph.output)
        if only_matmuls:
            inits[name].dims.append(1)
            columns[name] = name
        else:
            axis = f"{name}__column_axis"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axis))
            columns[name] = f"{name}__column"
            new_nodes.append(
                helper.make_node("Unsqueeze", [name, axis], [columns[name]], name=f"{name}__as_column")
            )
    squeeze_axis = "madclip__squeeze_last_axis"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), squeeze_axis))
    rebuilt = []
    for node in graph.node:
        if node in targets:
            out = node.output[0]
            node.input[1] = columns[node.input[1]]
            node.output[0] = f"{out}__column"
            rebuilt += [
                node,
                helper.make_node(
                    "Squeeze", [node.output[0], squeeze_axis], [out], name=f"{node.name or out}__squeeze"
                ),
            ]
        else:
            rebuilt.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes + rebuilt)
    # Shape inference results of the old outputs are stale: drop value_info of the rewritten tensors.
    stale = {n.output[0] for n in targets} | {name for name, col in columns.items() if col == name}
    keep = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    for inp in graph.input:  # an initializer also listed as a graph input (old IR versions) gets its new rank
        if columns.get(inp.name) == inp.name:
            inp.type.tensor_type.shape.dim.add().dim_value = 1
    tmp = path.with_name(f".{path.name}.rewrite.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    log.info(
        "%s: %d MatMul(s) with a 1-D constant written as matrix-vector products", path.name, len(targets)
    )
    return len(targets)


def quantize_openvino_int8(
    fp32_path: str | os.PathLike,
    out_xml: str | os.PathLike,
    calibration: np.ndarray,
    fp32_islands: Iterable[str],
    batch: int = 1,
    keep_tail_fp32: bool = True,
) -> dict:
    """NNCF post-training INT8 of the FP32 ONNX graph, saved as OpenVINO IR (`out_xml` and its `.bin`).

    `calibration`: preprocessed float32 images [N, 3, S, S] (the export's calibration set). The method's
    FP32 tail stays unquantized (NNCF ignored scope; `keep_tail_fp32=False` only for measuring what that
    buys, benchmarks/openvino_islands.py). Returns what the report records about it.
    """
    import contextlib
    import io

    import openvino as ov

    from madclip_runtime.engines.openvino_engine import head_node_names

    chatter = io.StringIO()  # NNCF draws progress bars and imports torch (which logs): behind -v only
    cpp_ext = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
    cpp_level = cpp_ext.level
    cpp_ext.setLevel(logging.ERROR if not log.isEnabledFor(logging.DEBUG) else cpp_level)
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            import nncf
    finally:
        cpp_ext.setLevel(cpp_level)
    model = ov.Core().read_model(str(fp32_path))
    islands = tuple(fp32_islands)
    ignored = head_node_names(model, islands) if keep_tail_fp32 else []
    items = [
        np.ascontiguousarray(calibration[i : i + batch], dtype=np.float32)
        for i in range(0, len(calibration), batch)
    ]
    quiet = [logging.getLogger(n) for n in ("nncf", OPENVINO)]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.ERROR)
    try:
        nncf.set_log_level(logging.ERROR)
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            quantized = nncf.quantize(
                model,
                nncf.Dataset(items),
                subset_size=len(items),
                model_type=nncf.ModelType.TRANSFORMER,
                ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
                preset=nncf.QuantizationPreset.MIXED,
            )
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
        if chatter.getvalue().strip():
            log.debug("nncf: %s", chatter.getvalue())
    out_xml = Path(out_xml)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return {
        "tool": f"nncf {nncf.__version__}, openvino {ov.__version__}",
        "calibration_images": int(len(calibration)),
        "ignored_scope_nodes": len(ignored),
        "fp32_islands": list(islands),
        "preset": "mixed",
        "model_type": "transformer",
    }


def _missing() -> str | None:
    """Why the OpenVINO variants cannot be made here (None: openvino and nncf are importable)."""
    for module, extra in ((OPENVINO, OPENVINO), ("nncf", OPENVINO)):
        try:
            __import__(module)
        except ImportError:
            return f'{module} is not installed (pip install "madclip[{extra},export]")'
    return None


def _run(path: Path, precision: str, images: np.ndarray, max_batch: int, cache: str) -> tuple[dict, dict]:
    """Run `images` with the runtime's own openvino backend; also a first (cold) and second (cached) start."""
    import time

    from madclip_runtime.engines.backends import create_backend

    backend = create_backend(OPENVINO, str(path), precision, max_batch, cache)
    try:
        t0 = time.perf_counter()
        out = backend.run(images)
        per_image = (time.perf_counter() - t0) / len(images)
        cold = backend.load_seconds
    finally:
        backend.close()
    again = create_backend(OPENVINO, str(path), precision, max_batch, cache)  # from OpenVINO's CACHE_DIR
    warm = again.load_seconds
    again.close()
    return out, {
        "seconds_per_image_cpu": per_image,
        "first_start_seconds": cold,
        "cached_start_seconds": warm,
    }


def openvino_variants(
    tmp: Path,
    torch_ref: dict,
    fp32_ref: dict,
    golden: np.ndarray,
    labels: np.ndarray,
    calibration: dict,
    calib_images: np.ndarray,
    islands: Iterable[str],
    max_batch: int,
    int8: bool,
) -> tuple[dict, dict]:
    """Check the bundle's FP32 graph on OpenVINO (fp32, bf16 where the CPU has it) and, with `int8`, write the
    NNCF INT8 IR; parity of each against the ONNX FP32 reference on the golden set.

    Returns (the export report's `openvino` entry, the metadata entries to add: `openvino_models` and
    `openvino_int8`). Without openvino/nncf the report says why and the bundle has no OpenVINO variant.
    """
    import tempfile

    from madclip_runtime.contract import MODEL_FILES, OPENVINO_MODEL_FILES
    from madclip_runtime.engines.openvino_engine import bf16_supported, cpu_features

    from .parity import diff_stats, variant_report

    reason = _missing()
    if reason is not None:
        log.info("no OpenVINO variants: %s", reason)
        return {"checked": False, "reason": reason}, {}
    report: dict = {"checked": True, "cpu_features": cpu_features(), "variants": {}}
    meta: dict = {}
    precisions = [FP32] + ([BF16] if bf16_supported() else [])
    if BF16 not in precisions:
        report[BF16] = "not checked: this CPU has no BF16 support (AVX512-BF16 or AMX)"
    with tempfile.TemporaryDirectory(prefix="madclip-ov-cache-") as cache:
        paths = {p: tmp / MODEL_FILES[FP32] for p in precisions}
        if int8:
            xml = tmp / OPENVINO_MODEL_FILES[INT8]
            meta["openvino_int8"] = quantize_openvino_int8(paths[FP32], xml, calib_images, islands)
            meta["openvino_models"] = {INT8: xml.name}
            paths[INT8] = xml
        for precision, path in paths.items():
            got, timing = _run(path, precision, golden, max_batch, cache)
            report["variants"][precision] = {
                **variant_report(fp32_ref, got, labels, calibration),
                "vs_pytorch": diff_stats(torch_ref, got),
                "reference": "onnx fp32",
                **timing,
            }
            if any(not np.isfinite(v["max_abs"]) for v in report["variants"][precision]["errors"].values()):
                raise OpenVinoParityError(
                    f"OpenVINO {precision} produced non-finite outputs on the golden set; no bundle written"
                )
    return report, meta
