"""The GPU extras install wheels that work together: one CUDA major (12) for onnxruntime-gpu, TensorRT and
cuda-python on workstations, and JetPack 6's CUDA 12.6 / NumPy 1.x on a Jetson (docs/gpu.md).

The static checks read pyproject.toml with tomllib and packaging; the `network` checks ask pip to resolve the
extras against the package index (`pip install --dry-run --report`) and read the chosen wheels' metadata."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# onnxruntime-gpu on PyPI: 1.19-1.26 are CUDA 12 builds (their [cuda] extra requires nvidia-cuda-runtime-cu12),
# 1.27 and later CUDA 13 (nvidia-cuda-runtime-cu13 / nvidia-cuda-runtime 13.x), read from the wheels' metadata.
ORT_GPU_CUDA13_FROM = Version("1.27.0")
JETPACK6_CUDA = (12, 6)  # JetPack 6.1 / 6.2


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extra(name: str) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _project()["optional-dependencies"][name]]
    return {r.name: r for r in reqs}


def _allows(req: Requirement, version: str) -> bool:
    return req.specifier.contains(version, prereleases=True)


def test_trt_extra_is_cuda12_tensorrt_10():
    trt = _extra("trt")
    assert "tensorrt" not in trt, "the bare tensorrt package installs the CUDA 13 variant by default"
    tensorrt = trt["tensorrt-cu12"]
    assert _allows(tensorrt, "10.3.0") and _allows(tensorrt, "10.16.1.11")
    assert not _allows(tensorrt, "11.0.0") and not _allows(tensorrt, "10.2.0")
    cuda = trt["cuda-python"]
    assert _allows(cuda, "12.9.0") and not _allows(cuda, "13.0.0") and not _allows(cuda, "11.8.7")


def test_gpu_extra_matches_the_cuda_major_of_the_trt_extra():
    ort = _extra("gpu")["onnxruntime-gpu"]
    assert _allows(ort, "1.20.0") and _allows(ort, "1.26.0")
    assert not _allows(ort, str(ORT_GPU_CUDA13_FROM)), "onnxruntime-gpu >= 1.27 is a CUDA 13 build"
    cuda_majors = {
        "onnxruntime-gpu": 12,  # every version the extra admits is < ORT_GPU_CUDA13_FROM
        "tensorrt": int(
            next(iter(n for n in _extra("trt") if n.startswith("tensorrt-cu")))[len("tensorrt-cu") :]
        ),
        "cuda-python": max(
            int(s.version.split(".")[0])
            for s in _extra("trt")["cuda-python"].specifier
            if s.operator in (">=", "==", "~=")
        ),
    }
    assert set(cuda_majors.values()) == {12}, cuda_majors


def test_jetson_extra_matches_jetpack6():
    jetson = _extra("jetson")
    assert not any(n.startswith("tensorrt") for n in jetson), "TensorRT comes from JetPack, not PyPI"
    cuda = jetson["cuda-python"]
    assert _allows(cuda, "12.6.0") and _allows(cuda, "12.6.2.post1")
    assert not _allows(cuda, "12.8.0") and not _allows(cuda, "12.9.0") and not _allows(cuda, "13.0.0")
    numpy = jetson["numpy"]
    base = next(Requirement(r) for r in _project()["dependencies"] if r.startswith("numpy"))
    assert not _allows(numpy, "2.0.0"), "JetPack's TensorRT 10.3 bindings are built against NumPy 1.x"
    assert _allows(numpy, "1.26.4") and _allows(base, "1.26.4")  # the core's numpy pin leaves room for it


def _resolve(requirements: list[str], *platform_args: str) -> list[dict]:
    """pip's own resolution (`--dry-run --report`) of `requirements`; skips when the index is unreachable."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        "-",
        "--only-binary=:all:",
        *platform_args,
        *requirements,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not reach the package index in time")
    if proc.returncode != 0:
        err = proc.stderr.lower()
        if any(k in err for k in ("connection", "network", "temporary failure", "max retries", "proxy")):
            pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip cannot resolve {requirements}: {proc.stderr.strip()[-600:]}")
    return json.loads(proc.stdout)["install"]


def _strs(name: str) -> list[str]:
    return [r for r in _project()["optional-dependencies"][name] if not r.startswith("madclip")]


@pytest.mark.network
def test_jetson_extra_resolves_for_jetpack6_python():
    """JetPack 6: Ubuntu 22.04, Python 3.10, aarch64; the extra resolves to wheels and to CUDA 12.6 / NumPy 1."""
    got = _resolve(
        _strs("jetson") + [str(r) for r in _project()["dependencies"]],
        "--platform",
        "manylinux2014_aarch64",
        "--python-version",
        "3.10",
    )
    versions = {i["metadata"]["name"].lower(): Version(i["metadata"]["version"]) for i in got}
    assert versions["cuda-python"].release[:2] == JETPACK6_CUDA
    assert versions["numpy"].major == 1


@pytest.mark.network
def test_gpu_extra_resolves_to_a_cuda12_onnxruntime():
    """The onnxruntime-gpu pip picks for the `gpu` extra declares CUDA 12 libraries in its own metadata."""
    got = _resolve(
        _strs("gpu"), "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--no-deps"
    )
    ort = next(i["metadata"] for i in got if i["metadata"]["name"].lower() == "onnxruntime-gpu")
    cuda_runtime = [Requirement(r) for r in ort.get("requires_dist", []) if "cuda-runtime" in r]
    if cuda_runtime:  # onnxruntime-gpu >= 1.21 declares them ([cuda] extra)
        assert all(r.name.endswith("-cu12") for r in cuda_runtime), [str(r) for r in cuda_runtime]
    assert Version(ort["version"]) < ORT_GPU_CUDA13_FROM
    cuda = _resolve(
        [r for r in _strs("trt") if r.startswith("cuda-python")],
        "--platform",
        "manylinux_2_28_x86_64",
        "--python-version",
        "3.11",
        "--no-deps",
    )
    assert Version(cuda[0]["metadata"]["version"]).major == 12
