#!/usr/bin/env python3
"""Every config of the reference's configs/ through the whole path a user's checkpoint takes:
the config made small where it allows (widths, codebook, depth of the GPT; the levels,
attention placement, channels, labels and conditioning kept), the reference's model built
from it with random weights (torch seed 0), saved as a checkpoint, converted by
tools/convert_taming.py, and dumped by tools/dump_reference.py on inputs of the config's kind,
so that `taming verify OUT/*` checks each one.

    python3 tools/check_reference_configs.py --reference-code path/to/taming-transformers \
        --configs tests/data/reference_configs --images A.png B.png --out OUT

Writes OUT/<config>/ (model.safetensors, reference.safetensors) for each config the engine
runs, and OUT/summary.json: per config "dumped", or "converted" with the reason no dump was
made (the scene-image transformers need object annotations for their condition).
"""
import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dump_reference  # noqa: E402
from convert_taming import convert  # noqa: E402


def shrink_autoencoder(cfg, cond_stage=False):
    p = cfg["params"]
    p.pop("ckpt_path", None)
    dd = p["ddconfig"]
    levels = len(dd["ch_mult"])
    res = 2 ** levels  # 2x2 codes
    # Attention where the config has it, at the same level.
    dd["attn_resolutions"] = [res * r // dd["resolution"] for r in dd["attn_resolutions"]
                              if res * r // dd["resolution"] >= 1]
    dd.update(ch=32, z_channels=8, resolution=res, num_res_blocks=1)
    p.update(n_embed=16, embed_dim=8)
    if cond_stage:
        p["sane_index_shape"] = True  # encode_to_c concatenates code rows
    lc = p.get("lossconfig", {})
    if lc.get("target", "").endswith("VQLPIPSWithDiscriminator"):
        lc.setdefault("params", {}).update(disc_ndf=8, disc_num_layers=2)
    return cfg


def shrink(model):
    model = copy.deepcopy(model)
    p = model["params"]
    if "ddconfig" in p:
        return shrink_autoencoder(model)
    p.pop("ckpt_path", None)
    shrink_autoencoder(p["first_stage_config"])
    cs = p.get("cond_stage_config")
    if isinstance(cs, dict) and "ddconfig" in cs.get("params", {}):
        shrink_autoencoder(cs, cond_stage=True)
    if isinstance(cs, dict) and cs.get("target", "").endswith("CoordStage"):
        cs["params"]["n_embed"] = 16
    # The vocabulary holds the 16 codes: a greedy sample past them would not decode.
    tp = p["transformer_config"]["params"]
    tp.update(n_layer=1, n_head=2, n_embd=32, vocab_size=16)
    return model


def inputs(model, images, out):
    """The condition maps the config needs, derived from the images: grey maps and label maps."""
    from PIL import Image
    p = model["params"]
    cs = p.get("cond_stage_config")
    kind = None
    if isinstance(cs, dict) and "ddconfig" in cs.get("params", {}):
        if "n_labels" in cs["params"]:
            kind = ("labels", cs["params"]["n_labels"])
        elif cs["params"]["ddconfig"]["in_channels"] == 1:
            kind = ("grey", None)
    if kind is None:
        return []
    paths = []
    for i, img in enumerate(images):
        g = Image.open(img).convert("RGBA")
        g = Image.alpha_composite(Image.new("RGBA", g.size, (255, 255, 255, 255)), g).convert("L")
        if kind[0] == "labels":
            g = g.point(lambda v, n=kind[1]: v * n // 256)
        path = os.path.join(out, f"cond_{i}.png")
        g.save(path)
        paths.append(path)
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-code", required=True)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--images", nargs=2, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch, instantiate = dump_reference.import_reference(a.reference_code)
    import yaml
    os.makedirs(a.out, exist_ok=True)
    summary = {}
    for name in sorted(f for f in os.listdir(a.configs) if f.endswith(".yaml")):
        with open(os.path.join(a.configs, name)) as f:
            model = shrink(yaml.safe_load(f)["model"])
        stem = name[:-5]
        work = os.path.join(a.out, stem)
        os.makedirs(work, exist_ok=True)
        torch.manual_seed(0)
        m = instantiate(model)
        ckpt, cfg = os.path.join(work, "model.ckpt"), os.path.join(work, "model.yaml")
        torch.save({"state_dict": m.state_dict()}, ckpt)
        with open(cfg, "w") as f:
            yaml.safe_dump({"model": model}, f, sort_keys=False)
        convert(ckpt, cfg, os.path.join(work, "model.safetensors"))
        cs = model["params"].get("cond_stage_config")
        if isinstance(cs, dict) and cs.get("target", "").endswith("DummyCondStage"):
            summary[name] = "converted; no dump: its condition is built from object annotations"
            print(f"{name}: converted ({summary[name]})")
            continue
        is_seg = model["target"].endswith("VQSegmentationModel")
        res = (model["params"]["ddconfig"] if "ddconfig" in model["params"]
               else model["params"]["first_stage_config"]["params"]["ddconfig"])["resolution"]
        x = inputs(model, a.images, work) if not is_seg else None
        m.train()
        if "ddconfig" in model["params"]:
            if is_seg or model["params"]["ddconfig"]["in_channels"] == 1:
                kind_model = {"params": {"cond_stage_config": model}}
                paths = inputs(kind_model, a.images, work)
            else:
                paths = a.images
            xin, labels = dump_reference.load_inputs(torch, m, paths, res)
            tensors = dump_reference.dump_vqgan(torch, m, xin)
            if labels is not None:
                tensors["input_labels"] = labels
        else:
            img = dump_reference.load_images(torch, a.images, res)
            args = argparse.Namespace(cond=x or None, classes=None)
            tensors = dump_reference.dump_transformer(torch, m, img, dump_reference.condition(torch, m, args, img))
        dump_reference.write_reference(os.path.join(work, "reference.safetensors"), tensors)
        os.remove(ckpt)
        summary[name] = "dumped"
        print(f"{name}: converted and dumped ({len(tensors)} tensors)")
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
