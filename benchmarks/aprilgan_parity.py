"""APRIL-GAN parity: madclip's `--method aprilgan` against the authors' code (ByChelsea/VAND-APRIL-GAN) on
identical seeded random weights. Not a test: it needs a checkout of the reference, which the project never ships
or imports; without one it prints "skipped" and exits 0.

    python benchmarks/aprilgan_parity.py --reference /work/ref/aprilgan [--json out.json]

What runs on the reference side (a subprocess with the checkout first on sys.path, so its bundled open_clip copy
is the one imported): its own `test.test()` in zero-shot and few-shot mode and its own `train.train()` for one
epoch of one batch, on a generated MVTec-format dataset. Their code is run unchanged; the harness only observes
it (wrapping functions it calls) and stubs what cannot run here:
- `cv2` (only used to write visualisation PNGs) and `pkg_resources` (an unused import) are stub modules;
- `Tensor.to('cuda')` (a hard-coded device for an unused attention map) is a no-op on this CPU machine;
- `PIL.Image.fromarray(float64 zeros, mode="L")` (their empty mask of a normal image; Pillow >= 11 refuses
  the mode for that dtype) gets the zeros as uint8, which is what older Pillow produced;
- during their train() only, `Tensor /=` is made out of place: their in-place normalisation of the linear
  outputs breaks autograd in fp32 (it only runs under CUDA fp16 autocast, where `norm` works on a copy); the
  values are the same.
Observed: the linear layers' outputs (LinearLayer.forward), the per-layer zero-shot maps (torch.softmax on the
upsampled two-class logits), the per-layer few-shot maps (F.interpolate of the 1-channel distance maps), the
text probabilities and image scores and full maps (the arguments of their roc_auc_score), the training loss
(Tensor.backward) and the linear layers after one Adam step (their saved epoch_1.pth).

Geometry: a tiny random CLIP with the structure of ViT-L-14-336 (12 blocks, taps 3/6/9/12 = 1/4 .. 4/4 of the
depth, CLS, ln_post, projection; width 64, embed 32) at 84 px (6 x 6 patches). Their tower needs >= 12 blocks
(it reads the attention of block 12), hence not madclip-tiny's 4.
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

TINY_NAME = "ViT-tiny-aprilgan-parity"  # their code branches on "ViT" in the name
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 84, "layers": 12, "width": 64, "head_width": 32, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIZE = 84
OBJECT = "Brain"
LAYERS_1BASED = [3, 6, 9, 12]
K_SHOT = 3
SEED = 10


# ---------------------------------------------------------------------------------------------------------------
# generated data (MVTec layout + meta.json, which their dataset class reads)
def write_dataset(root: Path, n_train: int = 6, n_good: int = 3, n_bad: int = 3, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    meta: dict = {"train": {OBJECT: []}, "test": {OBJECT: []}}
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE

    def image(bad: bool) -> tuple[np.ndarray, np.ndarray]:
        base = 0.5 + 0.3 * np.sin(2 * np.pi * (xx * rng.uniform(1, 3) + yy * rng.uniform(1, 3)))
        img = np.repeat(base[..., None], 3, axis=2) + rng.normal(0, 0.05, (SIZE, SIZE, 3))
        mask = np.zeros((SIZE, SIZE), bool)
        if bad:
            r, c, h = rng.integers(10, 50), rng.integers(10, 50), rng.integers(12, 28)
            mask[r : r + h, c : c + h] = True
            img[mask] = rng.uniform(0, 1, 3)
        return (np.clip(img, 0, 1) * 255).astype(np.uint8), mask

    def put(phase: str, specie: str, i: int, bad: bool) -> None:
        img, mask = image(bad)
        rel = f"{OBJECT}/{phase}/{specie}/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
        mrel = ""
        if bad:
            mrel = f"{OBJECT}/ground_truth/{specie}/{i:03d}_mask.png"
            (root / mrel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / mrel)
        meta[phase][OBJECT].append(
            {
                "img_path": rel,
                "mask_path": mrel,
                "cls_name": OBJECT,
                "specie_name": specie,
                "anomaly": int(bad),
            }
        )

    for i in range(n_train):
        put("train", "good", i, False)
    for i in range(n_good):
        put("test", "good", i, False)
    for i in range(n_bad):
        put("test", "lesion", i, True)
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------------------------------------------------------
# the reference side (runs in a subprocess; imports only the checkout, numpy, torch, PIL, sklearn)
def reference_worker(ref: str, work: str) -> None:
    import types

    sys.path.insert(0, ref)
    os.chdir(ref)
    cv2 = types.ModuleType("cv2")  # visualisation only
    cv2.COLOR_BGR2RGB = cv2.COLOR_RGB2BGR = cv2.COLORMAP_JET = 0
    cv2.imread = lambda path: np.zeros((SIZE, SIZE, 3), np.uint8)
    cv2.resize = lambda img, size: np.zeros((size[1], size[0], 3), np.uint8)
    cv2.cvtColor = lambda img, code: img
    cv2.applyColorMap = lambda img, cmap: np.repeat(np.asarray(img)[..., None], 3, axis=2)
    cv2.imwrite = lambda path, img: True
    sys.modules["cv2"] = cv2
    pkg = types.ModuleType("pkg_resources")
    pkg.packaging = None
    sys.modules["pkg_resources"] = pkg

    import torch
    import torch.nn.functional as F
    from PIL import Image

    fromarray = Image.fromarray  # their all-zero float64 mask with mode "L": refused by Pillow >= 11, cast

    def fromarray_l(arr, mode=None):
        if mode == "L" and np.asarray(arr).dtype.kind == "f":
            return fromarray(np.asarray(arr).astype(np.uint8), mode="L")
        return fromarray(arr) if mode is None else fromarray(arr, mode=mode)

    Image.fromarray = fromarray_l
    to = torch.Tensor.to
    torch.Tensor.to = lambda self, *a, **k: self if (a and a[0] == "cuda") else to(self, *a, **k)
    torch.set_num_threads(1)

    import open_clip  # the checkout's copy

    assert Path(open_clip.__file__).resolve().is_relative_to(Path(ref).resolve()), open_clip.__file__
    open_clip.add_model_config(Path(work) / "configs")
    import model as ref_model
    import test as ref_test
    import train as ref_train

    w = Path(work)
    rec: dict = {"linear": [], "softmax": [], "fs_interp": [], "roc": [], "loss": []}
    lin_forward = ref_model.LinearLayer.forward

    def lin_rec(self, tokens):
        out = lin_forward(self, tokens)
        rec["linear"].append([t.detach().clone() for t in out])
        return out

    softmax, interp = torch.softmax, F.interpolate

    def softmax_rec(x, *a, **k):
        y = softmax(x, *a, **k)
        if x.dim() == 4 and x.shape[1] == 2:
            rec["softmax"].append(y[:, 1].detach().clone())
        return y

    def interp_rec(x, *a, **k):
        y = interp(x, *a, **k)
        if x.dim() == 4 and x.shape[1] == 1:
            rec["fs_interp"].append(y[0, 0].detach().clone())
        return y

    roc = ref_test.roc_auc_score

    def roc_rec(y, s, *a, **k):
        rec["roc"].append(np.asarray(s, dtype=np.float64).copy())
        return roc(y, s, *a, **k)

    ref_model.LinearLayer.forward = lin_rec
    ref_test.LinearLayer.forward = lin_rec
    torch.softmax, F.interpolate, ref_test.roc_auc_score = softmax_rec, interp_rec, roc_rec
    out: dict = {}
    common = dict(
        data_path=str(w / "data"),
        config_path=str(w / "configs" / f"{TINY_NAME}.json"),
        checkpoint_path=str(w / "linear.pth"),
        dataset="mvtec",
        model=TINY_NAME,
        pretrained=str(w / "clip.pt"),
        features_list=LAYERS_1BASED,
        few_shot_features=LAYERS_1BASED,
        image_size=SIZE,
        k_shot=K_SHOT,
        seed=SEED,
    )
    for mode in ("zero_shot", "few_shot"):
        for k in rec:
            rec[k].clear()
        ref_test.setup_seed(SEED)
        ref_test.test(argparse.Namespace(mode=mode, save_path=str(w / f"ref_{mode}"), **common))
        n = len(rec["linear"])
        out[f"{mode}_linear"] = torch.stack(
            [torch.stack([t[0] for t in layers]) for layers in rec["linear"]]
        ).numpy()
        out[f"{mode}_layer_maps"] = (
            torch.stack(rec["softmax"]).reshape(n, len(LAYERS_1BASED), SIZE, SIZE).numpy()
        )
        if rec["fs_interp"]:
            out[f"{mode}_fs_layer_maps"] = torch.stack(rec["fs_interp"]).reshape(n, -1, SIZE, SIZE).numpy()
        pixel = [r for r in rec["roc"] if r.size == n * SIZE * SIZE]
        image = [r for r in rec["roc"] if r.size == n]
        out[f"{mode}_map"] = pixel[0].reshape(n, SIZE, SIZE)
        out[f"{mode}_image_score"] = image[0]
    out["k_shot_paths"] = np.array((w / "ref_few_shot" / "k_shot.txt").read_text().split())
    # one training step: their train() on the whole (test-split) set as one batch, from our initial weights
    init = torch.load(w / "linear.pth")["trainable_linearlayer"]

    class Seeded(ref_model.LinearLayer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.load_state_dict(init)

    backward = torch.Tensor.backward

    def backward_rec(self, *a, **k):
        rec["loss"].append(float(self.detach()))
        return backward(self, *a, **k)

    ref_train.LinearLayer = Seeded
    torch.Tensor.backward = backward_rec
    torch.Tensor.__itruediv__ = lambda self, other: self / other  # same values, autograd-safe in fp32
    n_test = sum(1 for _ in json.loads((w / "data" / "meta.json").read_text())["test"][OBJECT])
    ref_train.setup_seed(111)
    ref_train.train(
        argparse.Namespace(
            train_data_path=str(w / "data"),
            save_path=str(w / "ref_train"),
            config_path=common["config_path"],
            dataset="mvtec",
            model=TINY_NAME,
            pretrained=common["pretrained"],
            features_list=LAYERS_1BASED,
            epoch=1,
            learning_rate=1e-3,
            batch_size=n_test,
            image_size=SIZE,
            aug_rate=-1.0,
            print_freq=1,
            save_freq=1,
        )
    )
    out["train_loss"] = np.array(rec["loss"])
    stepped = torch.load(w / "ref_train" / "epoch_1.pth")["trainable_linearlayer"]
    for k, v in stepped.items():
        out[f"stepped.{k}"] = v.numpy()
    np.savez(w / "reference.npz", **out)


# ---------------------------------------------------------------------------------------------------------------
# madclip's side and the comparison
def run(ref: str) -> dict:
    import open_clip
    import torch

    from madclip_runtime.preprocess import PreprocessSpec
    from madclip_train.config import ModelConfig
    from madclip_train.data import Sample, load_arrays
    from madclip_train.methods.aprilgan.bank import bank_from_taps
    from madclip_train.methods.aprilgan.losses import aprilgan_loss
    from madclip_train.methods.aprilgan.scores import (
        few_shot_map,
        layer_logits,
        layer_probs,
        patch_distances,
        text_probability,
        transductive_score,
    )
    from madclip_train.model import build_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        (w / "configs").mkdir()
        (w / "configs" / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
        open_clip.add_model_config(w / "configs")
        meta = write_dataset(w / "data")
        spec = PreprocessSpec(image_size=SIZE, normalize="clip", interpolation="bicubic")
        cfg = ModelConfig(
            method="aprilgan",
            backbone=TINY_NAME,
            pretrained="none",
            init_seed=3,
            objective=OBJECT,
            preprocess=spec,
        )
        model = build_model(cfg, seed=5)
        from madclip_train.backbone import create_clip

        clip_sd = {
            k: v for k, v in create_clip(cfg).state_dict().items()
        }  # the same seeded weights, whole CLIP
        torch.save(clip_sd, w / "clip.pt")
        lin = {f"fc.{k}": v.clone() for k, v in model.linear.state_dict().items()}
        torch.save({"trainable_linearlayer": lin}, w / "linear.pth")
        proc = subprocess.run(
            [sys.executable, __file__, "--_worker", ref, str(w)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"},
        )
        if proc.returncode != 0:
            raise SystemExit(f"reference run failed:\n{proc.stderr[-3000:]}")
        R = dict(np.load(w / "reference.npz"))

        def samples(phase: str, paths=None) -> list:
            items = meta[phase][OBJECT]
            if paths is not None:
                by = {str(w / "data" / it["img_path"]): it for it in items}
                items = [by[p] for p in paths]
            return [
                Sample(
                    str(w / "data" / it["img_path"]),
                    it["anomaly"],
                    str(w / "data" / it["mask_path"]) if it["mask_path"] else None,
                )
                for it in items
            ]

        x, masks, labels = load_arrays(samples("test"), spec)
        shots, _, _ = load_arrays(samples("train", [str(w / "data" / p) for p in R["k_shot_paths"]]), spec)
        model.eval()
        with torch.no_grad():
            taps = model.cacheable(torch.from_numpy(x))
            linear = torch.stack([model.linear[j](taps[:, j, 1:]) for j in range(4)], dim=1).numpy()
            probs = layer_probs(layer_logits(taps, model.linear, model.text), SIZE)[:, :, 1]  # [L, N, S, S]
            bank = bank_from_taps(model.cacheable(torch.from_numpy(shots)))
            dist = patch_distances(taps, bank)
            fs_layers = torch.stack([few_shot_map(dist[j : j + 1], SIZE) for j in range(4)], dim=1).numpy()
            zmap = probs.sum(0).numpy()
            fmap = few_shot_map(dist, SIZE).numpy()
            p = text_probability(taps, model.tower.visual, model.text).numpy()
            full = zmap + fmap
            score = transductive_score(p, full.reshape(len(p), -1).max(1))
        # one training step (their train(): the whole set as one batch, Adam lr 1e-3, betas (0.5, 0.999))
        model.set_training(True)
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.5, 0.999))
        parts = aprilgan_loss(layer_logits(taps, model.linear, model.text), torch.from_numpy(masks), SIZE)
        opt.zero_grad()
        parts["total"].backward()
        opt.step()
        stepped = {f"fc.{k}": v.detach().numpy() for k, v in model.linear.state_dict().items()}

    def diff(a, b) -> float:
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    rows = {
        "linear-layer outputs": (diff(linear, R["zero_shot_linear"]), float(np.abs(linear).max())),
        "per-layer zero-shot maps": (diff(probs.transpose(0, 1).numpy(), R["zero_shot_layer_maps"]), 1.0),
        "zero-shot map (sum)": (diff(zmap, R["zero_shot_map"]), float(zmap.max())),
        "per-layer few-shot maps": (diff(fs_layers, R["few_shot_fs_layer_maps"]), float(fs_layers.max())),
        "few-shot map (Z + F)": (diff(full, R["few_shot_map"]), float(full.max())),
        "text probability (zero-shot score)": (diff(p, R["zero_shot_image_score"]), 1.0),
        "image score (few-shot, transductive)": (diff(score, R["few_shot_image_score"]), 1.0),
        "training loss, one step": (
            abs(float(parts["total"]) - float(R["train_loss"][0])),
            float(parts["total"]),
        ),
        "linear layers after one Adam step": (
            max(diff(v, R[f"stepped.{k}"]) for k, v in stepped.items()),
            max(float(np.abs(v).max()) for v in stepped.values()),
        ),
    }
    return {
        "rows": {k: {"max_abs_diff": d, "magnitude": m} for k, (d, m) in rows.items()},
        "geometry": {
            "config": TINY_CFG,
            "image_size": SIZE,
            "taps_1based": LAYERS_1BASED,
            "k_shot": K_SHOT,
            "n_test": int(len(labels)),
            "losses": {"ours": float(parts["total"]), "reference": float(R["train_loss"][0])},
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", help="checkout of ByChelsea/VAND-APRIL-GAN (skipped when absent)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        reference_worker(*args._worker)
        return 0
    if not args.reference or not (Path(args.reference) / "test.py").is_file():
        print("skipped: no VAND-APRIL-GAN checkout given (--reference PATH)")
        return 0
    res = run(str(Path(args.reference).resolve()))
    print(f"APRIL-GAN parity vs {args.reference} (tiny 12-block CLIP, {SIZE} px, k={K_SHOT}, fp32 CPU)")
    print(f"{'quantity':40s} {'max |diff|':>12s} {'magnitude':>10s}")
    for k, v in res["rows"].items():
        print(f"{k:40s} {v['max_abs_diff']:12.3e} {v['magnitude']:10.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
