"""Evidence that a refactor changed no number: the same tiny run of every method, trained, exported, dumped.

    python benchmarks/refactor_parity.py --save before.npz      # on the old code
    python benchmarks/refactor_parity.py --compare before.npz   # on the new code: prints max |diff| per array

Methods covered: MadCLIP, MVFA and MediCLIP (`--methods` to choose), each a tiny run (madclip-tiny, random
weights, generated data, fixed seeds); array names are prefixed with the method.

Only the public CLIs are used (madclip-demo-data, madclip-train, madclip-export), so the script runs unchanged on
both sides of a refactor. Dumped: the checkpoint tensors, the FP32 ONNX outputs on the bundle's golden inputs
(run here with onnxruntime directly), the golden reference outputs and the calibration numbers. Same machine,
same thread count: FP32 results are expected to be identical bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _run(*cmd: str) -> None:
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL)


METHODS = ("madclip", "mvfa", "mediclip")


def produce(work: Path, method: str) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    from safetensors.numpy import load_file

    bindir = Path(sys.executable).parent
    if not (work / "data").is_dir():
        _run(
            str(bindir / "madclip-demo-data"),
            "--out",
            str(work / "data"),
            "--n-valid",
            "4",
            "--n-test",
            "4",
            "--seed",
            "5",
        )
    run, bundle = work / f"run-{method}", work / f"bundle-{method}"
    _run(
        str(bindir / "madclip-train"),
        "--method",
        method,
        "--data",
        str(work / "data" / "Brain_AD"),
        "--out",
        str(run),
        "--shots",
        "3",
        "--epochs",
        "2",
        "--seed",
        "7",
        "--backbone",
        "madclip-tiny",
        "--pretrained",
        "none",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    )
    _run(str(bindir / "madclip-export"), str(run), "--out", str(bundle), "--max-batch", "4")
    out = {f"ckpt/{k}": v for k, v in load_file(str(run / "checkpoint.safetensors")).items()}
    golden = np.load(bundle / "golden.npz")
    out.update({f"golden/{k}": golden[k] for k in golden.files if golden[k].dtype.kind in "fiu"})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for i in range(len(golden["image"])):
        for name, value in zip(names, sess.run(None, {"image": golden["image"][i : i + 1]})):
            out.setdefault(f"onnx/{name}", []).append(value)
    out = {k: np.concatenate(v) if isinstance(v, list) else v for k, v in out.items()}
    meta = json.loads((bundle / "metadata.json").read_text())
    cal = meta["calibration"]
    out["calibration"] = np.array(
        [
            np.nan if cal.get(k) is None else cal[k]
            for k in ("threshold", "threshold_score_map_max", "map_threshold")
        ]
    )
    return {f"{method}/{k}": v for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="NPZ")
    g.add_argument("--compare", metavar="NPZ")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    got: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            got.update(produce(Path(tmp), method))
    if args.save:
        np.savez(args.save, **{k.replace("/", "__"): v for k, v in got.items()})
        print(f"saved {len(got)} arrays to {args.save}")
        return 0
    ref = {k.replace("__", "/"): v for k, v in np.load(args.compare).items()}
    ref = {k: v for k, v in ref.items() if k.split("/")[0] in args.methods}
    worst = 0.0
    per_method: dict[str, float] = {}
    for k in sorted(set(ref) | set(got)):
        if k not in ref or k not in got:
            print(f"{k:50s} only in {'new' if k in got else 'old'}")
            worst = per_method[k.split("/")[0]] = float("inf")
            continue
        a, b = np.asarray(ref[k]), np.asarray(got[k])
        same = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64)) if a.shape == b.shape else None
        d = 0.0 if same else (float(np.nanmax(diff)) if diff is not None and diff.size else float("inf"))
        d = d if same or d > 0 else float("inf")  # equal values but different bytes/dtype: not bit-identical
        worst = max(worst, d)
        method = k.split("/")[0]
        per_method[method] = max(per_method.get(method, 0.0), d)
        print(f"{k:50s} {str(a.shape):>20s} max|diff| {d:.3g}")
    for method in args.methods:
        n = sum(1 for k in ref if k.startswith(method + "/"))
        w = per_method.get(method, 0.0)
        verdict = "bit-identical" if w == 0 else "DIFFERENT"
        print(f"{method:10s} {n:4d} arrays  worst max|diff| {w:.3g} ({verdict})")
    print(
        f"worst max|diff| over {len(ref)} arrays: {worst:.3g} ({'bit-identical' if worst == 0 else 'DIFFERENT'})"
    )
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
