#!/usr/bin/env python3
"""Writes a small spatially conditioned Net2NetTransformer (a second VQGAN
encodes the condition image) with random weights from the reference's own
initialisation, rounded to f16 so `taming export-half` keeps them exactly:
the checkpoint and config behind tests/data/spatial_transformer.

    python3 tools/make_spatial_fixture.py --reference-code path/to/taming-transformers --out DIR
    python3 tools/dump_reference.py --ckpt DIR/spatial.ckpt --config DIR/spatial.yaml --size 16 \
        --images A.png B.png --cond C.png D.png --reference-code ... --out FIXTURE
    taming export-half FIXTURE/model.safetensors FIXTURE/model.safetensors
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dump_reference  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--reference-code", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
torch, instantiate = dump_reference.import_reference(a.reference_code)
import yaml  # noqa: E402
vq = {"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 8, "n_embed": 32,
      "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                   "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
      "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}}
cfg = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer", "params": {
    "cond_stage_key": "segmentation", "first_stage_config": vq,
    "cond_stage_config": {"target": vq["target"], "params": dict(vq["params"], sane_index_shape=True)},
    "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                           "params": {"vocab_size": 32, "block_size": 127, "n_layer": 1, "n_head": 2, "n_embd": 32}}}}}
torch.manual_seed(0)
model = instantiate(cfg["model"])
sd = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
os.makedirs(a.out, exist_ok=True)
torch.save({"state_dict": sd}, os.path.join(a.out, "spatial.ckpt"))
with open(os.path.join(a.out, "spatial.yaml"), "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
print(f"wrote {a.out}/spatial.ckpt and spatial.yaml ({sum(p.numel() for p in model.parameters())} parameters)")
