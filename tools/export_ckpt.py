#!/usr/bin/env python3
"""Writes a taming-wgpu model file back as the reference's checkpoint and
config, so a model trained here runs in CompVis/taming-transformers (and
tools/dump_reference.py can make parity fixtures of it):

    python3 tools/export_ckpt.py --model M.safetensors --ckpt M.ckpt --config M.yaml

The checkpoint is {"state_dict": {...}} with the reference's tensor names
(f16 weights widened to f32); the config is the model file's `model:` block.
A transformer's first stage gets the reference's DummyLoss (its loss is not
in the file, and the reference's VQLPIPSWithDiscriminator would download
LPIPS weights). Needs torch and PyYAML.
"""
import argparse
import json
import struct
import sys

DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "I64": ("int64", 8)}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        sys.exit(f"{path}: not a safetensors file")
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    return header, meta, body


# Config keys of ours (taming-wgpu options the reference's classes would reject).
OUR_KEYS = ("codebook_l2_norm", "codebook_embed_dim", "cond_dropout_prob")


def find_our_keys(v, path=""):
    """The paths of our option keys anywhere in a config (set to anything but off)."""
    found = []
    if isinstance(v, dict):
        for k, x in v.items():
            if k in OUR_KEYS and x not in (None, False, 0):
                found.append(path + k)
            found += find_our_keys(x, path + k + ".")
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--config", required=True)
    a = ap.parse_args()
    import numpy as np
    import torch
    import yaml
    header, meta, body = read_safetensors(a.model)
    if "config" not in meta:
        sys.exit(f"{a.model}: no config in its metadata (not a taming-wgpu model file)")
    config = json.loads(meta["config"])
    ours = find_our_keys(config)
    if ours:
        sys.exit(f"{a.model}: uses options the reference does not have ({', '.join(ours)}); "
                 "it cannot run in CompVis/taming-transformers")
    state = {}
    for name, info in header.items():
        dtype, size = DTYPES.get(info["dtype"], (None, None))
        if dtype is None:
            sys.exit(f"{a.model}: tensor {name} has dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        arr = np.frombuffer(body[lo:hi], dtype=dtype).reshape(info["shape"])
        t = torch.from_numpy(arr.copy())
        state[name] = t.float() if t.dtype == torch.float16 else t
    params = config.get("params", {})
    # minGPT's causal masks are buffers of the reference's state_dict (not parameters, so not in our files).
    gpt = params.get("transformer_config", {}).get("params", {})
    if gpt:
        bs = gpt["block_size"]
        for i in range(gpt["n_layer"]):
            state.setdefault(f"transformer.blocks.{i}.attn.mask", torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs))
    if "first_stage_config" in params:
        params["first_stage_config"].setdefault("params", {})["lossconfig"] = {
            "target": "taming.modules.losses.vqperceptual.DummyLoss"}
    torch.save({"state_dict": state}, a.ckpt)
    with open(a.config, "w") as f:
        yaml.safe_dump({"model": config}, f, sort_keys=False)
    print(f"wrote {a.ckpt} ({len(state)} tensors) and {a.config}")


if __name__ == "__main__":
    main()
