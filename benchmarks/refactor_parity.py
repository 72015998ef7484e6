"""Evidence that a refactor changed no number: train and export the same tiny run, dump every output.

    python benchmarks/refactor_parity.py --save before.npz      # on the old code
    python benchmarks/refactor_parity.py --compare before.npz   # on the new code: prints max |diff| per array

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


def produce(work: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort
    from safetensors.numpy import load_file

    bindir = Path(sys.executable).parent
    _run(str(bindir / "madclip-demo-data"), "--out", str(work / "data"), "--n-valid", "4", "--n-test", "4",
         "--seed", "5")
    run, bundle = work / "run", work / "bundle"
    _run(str(bindir / "madclip-train"), "--data", str(work / "data" / "Brain_AD"), "--out", str(run), "--shots", "3",
         "--epochs", "2", "--backbone", "madclip-tiny", "--pretrained", "none", "--device", "cpu")
    _run(str(bindir / "madclip-export"), str(run), "--out", str(bundle), "--max-batch", "4")
    out = {f"ckpt/{k}": v for k, v in load_file(str(run / "checkpoint.safetensors")).items()}
    golden = np.load(bundle / "golden.npz")
    out.update({f"golden/{k}": golden[k] for k in golden.files if golden[k].dtype.kind in "fiu"})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    for i in range(len(golden["image"])):
        for name, value in zip(names, sess.run(None, {"image": golden["image"][i:i + 1]})):
            out.setdefault(f"onnx/{name}", []).append(value)
    out = {k: np.concatenate(v) if isinstance(v, list) else v for k, v in out.items()}
    meta = json.loads((bundle / "metadata.json").read_text())
    cal = meta["calibration"]
    out["calibration"] = np.array([cal["threshold"], cal["threshold_score_map_max"], cal["map_threshold"]])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="NPZ")
    g.add_argument("--compare", metavar="NPZ")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        got = produce(Path(tmp))
    if args.save:
        np.savez(args.save, **{k.replace("/", "__"): v for k, v in got.items()})
        print(f"saved {len(got)} arrays to {args.save}")
        return 0
    ref = {k.replace("__", "/"): v for k, v in np.load(args.compare).items()}
    worst = 0.0
    for k in sorted(set(ref) | set(got)):
        if k not in ref or k not in got:
            print(f"{k:50s} only in {'new' if k in got else 'old'}")
            worst = float("inf")
            continue
        a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
        d = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
        worst = max(worst, d)
        print(f"{k:50s} {str(a.shape):>20s} max|diff| {d:.3g}")
    print(f"worst max|diff| over {len(ref)} arrays: {worst:.3g} ({'bit-identical' if worst == 0 else 'DIFFERENT'})")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
