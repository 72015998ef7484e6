#!/usr/bin/env bash
# One command that proves the GPU half of madclip (docs/gpu.md): on a Linux machine with an NVIDIA GPU, from a
# clean checkout, it creates its own venv, installs madclip the way docs/gpu.md tells a GPU user to, and runs
# benchmarks/gpu_check.py (versions, gpu/trt tests, CUDA training, exports, TensorRT engines, self-tests,
# madclip-bench), which writes benchmarks/results/gpu_check/gpu_check.{json,md}.
# Each TensorRT engine is built once (the export's engine cache is shared by every later step), and where
# TensorRT offers both FP16 recipes (10.12-10.x) the FP16-flag path of JetPack's TensorRT 10.3 is built,
# self-tested and benchmarked too (--fp16-path both, the default; --fp16-path auto: only this TensorRT's own).
# The report states each step's time budget on an H100/H200 beside the measured time (whole check: < 10 min
# for ViT-B-16). Without a GPU it says so in one line and exits 0 (CI runs it that way).
#
#   benchmarks/gpu_check.sh [--quick] [--fp16-path both|auto] [--out DIR]
#   GPU_CHECK_VENV=/path/venv  reuse or place the venv elsewhere (default .gpu-check-venv in the checkout)
#   GPU_CHECK_SYSTEM_SITE=1    let the venv see the system Python's packages (Jetson: JetPack's TensorRT)
#   GPU_CHECK_JETSON_INDEX=URL where onnxruntime-gpu for JetPack 6 comes from (default: Jetson AI Lab jp6/cu126)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-python3}"

# The GPU test needs nothing installed: gpu_check.py's no_gpu_reason() uses only the standard library.
if ! reason="$("$py" -c "import sys; sys.path.insert(0, '$here'); import gpu_check as g; r = g.no_gpu_reason(); print(r or '')")"; then
    echo "gpu_check: cannot run $py"; exit 1
fi
if [[ -n "$reason" ]]; then
    echo "gpu_check: $reason; nothing to check (exit 0)"
    exit 0
fi

venv="${GPU_CHECK_VENV:-$root/.gpu-check-venv}"
if [[ -f /etc/nv_tegra_release ]]; then
    GPU_CHECK_SYSTEM_SITE="${GPU_CHECK_SYSTEM_SITE:-1}"  # JetPack's TensorRT lives in the system Python
fi
if [[ ! -x "$venv/bin/python" ]]; then
    if [[ "${GPU_CHECK_SYSTEM_SITE:-0}" == "1" ]]; then
        timeout 120 "$py" -m venv --system-site-packages "$venv"
    else
        timeout 120 "$py" -m venv "$venv"
    fi
fi
# docs/gpu.md's install: onnxruntime-gpu + TensorRT + cuda-python (all CUDA 12), trainer, exporter, tests.
extras="gpu,trt,train,export,medical,dev"
if [[ -f /etc/nv_tegra_release ]]; then
    extras="jetson,train,export,medical,dev"  # JetPack brings TensorRT; onnxruntime-gpu from the Jetson index
fi
timeout 600 "$venv/bin/python" -m pip install -q --upgrade pip
timeout 900 "$venv/bin/python" -m pip install -q -e "$root[$extras]"
if [[ -f /etc/nv_tegra_release ]]; then
    # onnxruntime-gpu for JetPack 6 (CUDA 12.6) comes from NVIDIA's Jetson AI Lab index; ort-* are optional here.
    timeout 600 "$venv/bin/python" -m pip install -q onnxruntime-gpu "numpy<2" \
        --extra-index-url "${GPU_CHECK_JETSON_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}" \
        || echo "gpu_check: onnxruntime-gpu for Jetson not installed; ort-cuda/ort-trt are skipped"
fi
exec "$venv/bin/python" "$here/gpu_check.py" "$@"
