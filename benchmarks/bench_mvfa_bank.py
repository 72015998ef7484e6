"""Size of MVFA's memory bank as graph constants, per backbone and k (k normal shots x 11 views).

The bank holds, per tapped layer, every token (CLS + P patches) of every augmented normal view: rows =
11 k (1 + P), each an E-dim vector (E = the text width the adapters project to). Only the scoring head's bank
goes into a bundle. Sizes follow from the open_clip configs (no weights needed; the ViT-L numbers are computed,
not run); for the tiny config the bank of a real `finalize()` is measured to check the formula.

    python benchmarks/bench_mvfa_bank.py
"""

from __future__ import annotations

from _common import print_machine, table, write_json

VIEWS = 11


def geometry(backbone: str, image_size: int) -> tuple[int, int, int]:
    """(tokens per image, embed dim E, vision params) from the open_clip config."""
    import open_clip

    from madclip_train.backbone import register_tiny

    register_tiny()
    cfg = open_clip.get_model_config(backbone)
    v = cfg["vision_cfg"]
    grid = image_size // v["patch_size"]
    width, layers = v["width"], v["layers"]
    params = layers * 12 * width * width  # attention + 4x MLP, the dominant terms
    return 1 + grid * grid, cfg["embed_dim"], params


def measured_tiny(k: int) -> int:
    import torch

    from madclip_train.config import ModelConfig
    from madclip_train.methods.mvfa import MVFAModel
    from madclip_train.methods.mvfa.augment import augment_x11

    m = MVFAModel.build(ModelConfig(backbone="madclip-tiny", pretrained="none", objective="Brain"), seed=0)
    imgs, masks, src = augment_x11(
        torch.rand(k + 1, 3, 240, 240), torch.zeros(k + 1, 240, 240, dtype=torch.bool)
    )
    labels = (src == k).long()  # one abnormal shot, k normal
    source = type(
        "Source",
        (),
        {
            "images": imgs,
            "labels": labels,
            "masks": masks,
            "groups": src,
            "__len__": lambda self: len(labels),
        },
    )()
    m.finalize(source, "cpu")
    return m.bank.numel()


def main() -> None:
    print_machine()
    rows, out = [], []
    for backbone in ("ViT-L-14-336", "ViT-B-16", "madclip-tiny"):
        tokens, e, params = geometry(backbone, 240)
        for k in (2, 4, 8, 16):
            values = 4 * VIEWS * k * tokens * e
            rec = {
                "backbone": backbone,
                "k": k,
                "rows_per_layer": VIEWS * k * tokens,
                "dim": e,
                "values": values,
                "mb_fp32": values * 4 / 1e6,
                "mb_fp16": values * 2 / 1e6,
                "tower_mb_fp32": params * 4 / 1e6,
            }
            if backbone == "madclip-tiny" and k == 2:
                rec["measured_values"] = measured_tiny(k)
            out.append(rec)
            rows.append(
                [
                    backbone,
                    k,
                    rec["rows_per_layer"],
                    e,
                    rec["mb_fp32"],
                    rec["mb_fp16"],
                    rec["tower_mb_fp32"],
                    rec.get("measured_values"),
                ]
            )
    table(
        "MVFA memory bank (4 layers, 11 views per normal shot, image 240)",
        [
            "backbone",
            "k",
            "rows/layer",
            "E",
            "bank MB fp32",
            "bank MB fp16",
            "tower MB fp32 (approx)",
            "measured values",
        ],
        rows,
    )
    write_json("mvfa_bank.json", {"results": out})


if __name__ == "__main__":
    main()
