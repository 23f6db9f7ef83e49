#!/usr/bin/env python3
"""Writes a small model of one kind with random weights from the reference's own
initialisation (torch seed 0), rounded to f16 so `taming export-half` keeps them exactly:
the checkpoints and configs behind the parity fixtures in tests/data.

    python3 tools/make_fixture.py KIND --reference-code path/to/taming-transformers --out DIR \
        [--images A.png B.png]
    python3 tools/dump_reference.py --ckpt DIR/KIND.ckpt --config DIR/KIND.yaml --size 16 ...

KIND: spatial (a transformer conditioned on photos by a second VQModel), depth (on one-channel
maps), segmentation (on label maps, by a VQSegmentationModel), coord (on coordinates, CoordStage),
gumbel (a GumbelVQ), segmentation_vqgan (a VQSegmentationModel with BCELossWithQuant).
With --images, DIR also gets the condition maps derived from them, 16x16: `depth_<i>.png` (the
image's grey levels) and `labels_<i>.png` (its grey levels in 7 bands: label ids 0..6).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dump_reference  # noqa: E402

N_LABELS = 7


def vqgan(target="taming.models.vqgan.VQModel", channels=3, **extra):
    params = {"embed_dim": 8, "n_embed": 32,
              "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": channels,
                           "out_ch": channels, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                           "attn_resolutions": [8], "dropout": 0.0},
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    params.update(extra)
    return {"target": target, "params": params}


def transformer(cond_stage):
    return {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
        "cond_stage_key": "condition", "first_stage_config": vqgan(),
        "cond_stage_config": cond_stage,
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                               "params": {"vocab_size": 32, "block_size": 127, "n_layer": 1, "n_head": 2,
                                          "n_embd": 32}}}}


def model_config(kind):
    if kind == "spatial":
        return transformer(vqgan(sane_index_shape=True))
    if kind == "depth":
        return transformer(vqgan(channels=1, sane_index_shape=True))
    if kind == "segmentation":
        return transformer(vqgan("taming.models.vqgan.VQSegmentationModel", N_LABELS, n_labels=N_LABELS,
                                 sane_index_shape=True))
    if kind == "coord":
        return transformer({"target": "taming.modules.misc.coord.CoordStage",
                            "params": {"n_embed": 32, "down_factor": 2}})
    if kind == "gumbel":
        return vqgan("taming.models.vqgan.GumbelVQ", kl_weight=1e-3, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}})
    if kind == "segmentation_vqgan":
        return vqgan("taming.models.vqgan.VQSegmentationModel", N_LABELS, n_labels=N_LABELS,
                     lossconfig={"target": "taming.modules.losses.segmentation.BCELossWithQuant",
                                 "params": {"codebook_weight": 1.0}})
    raise SystemExit(f"unknown kind '{kind}'")


def write_maps(images, out):
    from PIL import Image
    for i, path in enumerate(images):
        grey = Image.open(path).convert("RGBA")
        white = Image.new("RGBA", grey.size, (255, 255, 255, 255))
        grey = Image.alpha_composite(white, grey).convert("L").resize((16, 16), Image.BILINEAR)
        grey.save(os.path.join(out, f"depth_{i}.png"))
        grey.point(lambda v: min(N_LABELS - 1, v * N_LABELS // 256)).save(os.path.join(out, f"labels_{i}.png"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--reference-code", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", nargs="*", default=[])
    a = ap.parse_args()
    torch, instantiate = dump_reference.import_reference(a.reference_code)
    import yaml
    cfg = {"model": model_config(a.kind)}
    torch.manual_seed(0)
    model = instantiate(cfg["model"])
    sd = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    os.makedirs(a.out, exist_ok=True)
    torch.save({"state_dict": sd}, os.path.join(a.out, f"{a.kind}.ckpt"))
    with open(os.path.join(a.out, f"{a.kind}.yaml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    write_maps(a.images, a.out)
    print(f"wrote {a.out}/{a.kind}.ckpt and {a.kind}.yaml ({sum(p.numel() for p in model.parameters())} parameters)")


if __name__ == "__main__":
    main()
