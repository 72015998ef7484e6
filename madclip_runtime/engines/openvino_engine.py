"""The OpenVINO CPU backend ("openvino"): FP32, BF16 and NNCF INT8 on x86 CPUs.

- fp32: the bundle's `model.onnx`, read by OpenVINO's ONNX frontend, `INFERENCE_PRECISION_HINT` f32 (the
  CPU plugin would otherwise run BF16 on AMX CPUs by default).
- bf16: the same `model.onnx` with `INFERENCE_PRECISION_HINT` bf16. Needs a CPU with BF16 instructions
  (AVX512-BF16 or AMX); elsewhere OpenVINO silently runs f32, so we refuse with a one-line message instead.
  The CPU plugin keeps the graph tail after the last MatMul (sigmoid, upsampling, reductions) in FP32 by
  itself; the per-node "keep original precision" attribute (`precise_0`) set from Python does not change
  what OpenVINO 2026.4 lowers to BF16 (measured: identical runtime precisions and outputs), so the score
  head's MatMuls run in BF16; the errors this costs are measured per method in docs/runtime.md.
- int8: `model_int8_ov.xml/.bin`, the NNCF post-training quantized IR written at export (static INT8
  activations and weights, the FP32 tail in NNCF's ignored scope).

Compiled models are cached with OpenVINO's `CACHE_DIR` in `<cache root>/openvino/<model content id>`, so the
second start of a bundle skips compilation. `openvino` is imported lazily; without it the backend is a
one-line BackendUnavailable naming the extra.

"auto" picks openvino over ort-cpu (docs/runtime.md, "How auto chooses"): for bf16 (only OpenVINO has BF16
kernels) and for int8 when the bundle has the OpenVINO INT8 IR (static INT8 beats onnxruntime's dynamic INT8);
fp32 stays on onnxruntime (OpenVINO FP32 was faster in one noisy run here: not enough to move the default).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..contract import BF16, FP32, INPUT_NAME, INT8, OPENVINO, OPENVINO_PRECISIONS, OUTPUT_NAMES
from ..errors import BackendUnavailable, BundleError

log = logging.getLogger(__name__)

PRECISION_HINT = {FP32: "f32", BF16: BF16, INT8: "f32"}  # int8 IR: quantized ops INT8, the rest f32


def import_openvino() -> Any:
    """The openvino module, or BackendUnavailable with the pip command that installs it."""
    try:
        import openvino as ov  # noqa: PLC0415 (optional, heavy)
    except ImportError:
        raise BackendUnavailable(
            f'{OPENVINO}: openvino is not installed: pip install "madclip[openvino]"'
        ) from None
    return ov


def installed() -> bool:
    """openvino can be imported (no model is compiled)."""
    try:
        import_openvino()
    except BackendUnavailable:
        return False
    return True


def cpu_capabilities() -> set[str]:
    """OpenVINO's CPU OPTIMIZATION_CAPABILITIES (e.g. FP32, BF16, INT8, FP16), empty without openvino."""
    try:
        ov = import_openvino()
        return {str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}
    except (BackendUnavailable, RuntimeError):
        return set()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_features() -> dict[str, bool]:
    """The CPU features that decide the OpenVINO paths (from /proc/cpuinfo on Linux)."""
    flags = _cpu_flags()
    return {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "amx_int8": "amx_int8" in flags,
        "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
    }


def bf16_supported() -> bool:
    """The CPU runs BF16 natively (OpenVINO reports BF16: AVX512-BF16 or AMX)."""
    return "BF16" in cpu_capabilities()


def prefer_for(precision: str, has_int8_ir: bool) -> bool:
    """The documented "auto" rule: does openvino beat ort-cpu for `precision` on this CPU?

    bf16: always (onnxruntime has no BF16 kernels); int8: when the bundle has the NNCF INT8 IR (static INT8,
    measured faster than onnxruntime's dynamic INT8: benchmarks/RESULTS.md); fp32: no, onnxruntime FP32 stays
    the default (OpenVINO FP32 was faster in one noisy shared-machine run only; `--backend openvino` runs it).
    """
    if not installed():
        return False
    if precision == BF16:
        return True
    if precision == INT8:
        return has_int8_ir
    return False


def head_node_names(model: Any, islands: Iterable[str]) -> list[str]:
    """Friendly names of every node from the consumers of the `islands` constants on (the FP32 tail).

    The ONNX frontend names a Constant after its initializer (`dt`); a rewrite may have put a Reshape or
    Unsqueeze between them, which counts as part of the tail too. Constants themselves are not listed.
    """
    wanted = set(islands)
    start = [
        op
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and (op.get_friendly_name() in wanted or wanted & set(op.output(0).get_names()))
    ]
    seen: dict[str, Any] = {}
    stack = [t.get_node() for op in start for t in op.output(0).get_target_inputs()]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen or node.get_type_name() == "Result":
            continue
        seen[name] = node
        for out in node.outputs():
            stack.extend(t.get_node() for t in out.get_target_inputs())
    return sorted(seen)


def cache_dir_for(root: str | os.PathLike, model_id: str) -> Path:
    """OpenVINO's CACHE_DIR for one model: keyed by the model's content id (sha256 of its files)."""
    return Path(root) / OPENVINO / model_id[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Exception from src")]
    return (lines[0] if lines else text.splitlines()[0] if text else type(exc).__name__)[:300]


def _contract_name(names: Iterable[str], wanted: Iterable[str]) -> str:
    names = set(names)
    return next((n for n in wanted if n in names), min(names) if names else "")


class OpenVinoRunner:
    """A compiled model and one infer request (single-threaded use, like an onnxruntime session)."""

    def __init__(self, compiled: Any, path: Path):
        self.compiled, self.path = compiled, path
        self.request = compiled.create_infer_request()
        # A tensor may carry several names (fused Identity nodes): take the contract's name when it has it.
        self.output_names = [_contract_name(o.get_names(), OUTPUT_NAMES) for o in compiled.outputs]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """float32 images [B, 3, H, W] -> float32 outputs by name."""
        try:
            result = self.request.infer({INPUT_NAME: images})
        except RuntimeError as exc:
            raise BundleError(f"{self.path}: inference failed on {OPENVINO}: {_first_line(exc)}") from None
        return {
            name: np.array(result[out], dtype=np.float32, copy=True)
            for name, out in zip(self.output_names, self.compiled.outputs)
        }


def compile_model(
    path: Path, precision: str, cache_dir: Path | None, threads: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Read and compile `path` for the CPU at `precision`; returns (runner, info for the log and reports)."""
    ov = import_openvino()
    if precision not in OPENVINO_PRECISIONS:
        raise BackendUnavailable(
            f"{OPENVINO}: no {precision} path (OpenVINO runs {', '.join(OPENVINO_PRECISIONS)})"
        )
    core = ov.Core()
    if precision == BF16 and "BF16" not in {
        str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    }:
        raise BackendUnavailable(
            f"{OPENVINO}: this CPU has no BF16 support (neither AVX512-BF16 nor AMX); use fp32 or int8"
        )
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": PRECISION_HINT[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache_dir)
    try:
        compiled = core.compile_model(str(path), "CPU", config)
    except RuntimeError as exc:
        raise BundleError(f"{path}: OpenVINO cannot compile the model: {_first_line(exc)}") from None
    inputs = [_contract_name(i.get_names(), (INPUT_NAME,)) for i in compiled.inputs]
    if inputs != [INPUT_NAME]:
        raise BundleError(f"{path}: model inputs {inputs}, expected ['{INPUT_NAME}']")
    info = {
        OPENVINO: ov.__version__,
        "inference_precision": PRECISION_HINT[precision],
        "cache_dir": str(cache_dir) if cache_dir else None,
    }
    return OpenVinoRunner(compiled, path), info


def runtime_precisions(runner: OpenVinoRunner) -> dict[str, int]:
    """How many executed nodes run in each precision (OpenVINO's runtime model): checks what BF16 did."""
    counts: dict[str, int] = {}
    for op in runner.compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        key = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
        counts[key] = counts.get(key, 0) + 1
    return counts
