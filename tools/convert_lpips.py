#!/usr/bin/env python3
"""Write LPIPS weights (VGG16 features + the LPIPS "lin" layers) as a
safetensors file that `taming train-vqgan --lpips FILE` reads.

Two sources:
  --from-ckpt X.ckpt          a taming VQModel checkpoint: its loss.perceptual_loss.* tensors
  --vgg VGG.pth --lin LIN.pth torchvision's VGG16 state dict (features.N.weight/bias) and the
                              LPIPS v0.1 lin layers (lin0.model.1.weight ... lin4), as the
                              reference's taming/modules/losses/lpips.py loads them

Tensor names are LPIPS's own (scaling_layer.shift, net.slice1.0.weight, lin0.model.1.weight).
Needs no PyTorch: checkpoints are read with tools/convert_taming.py's reader, which handles
torch.save's zip format; re-save an old-format file once with torch.save to convert it.
"""

import argparse
import collections
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_taming import ConvertError, Tensor, load_checkpoint, tensor_bytes, write_safetensors  # noqa: E402

# VGG16 conv layers (index in `features`) of each LPIPS slice, and the lin layers' channels.
SLICES = [(1, [0, 2]), (2, [5, 7]), (3, [10, 12, 14]), (4, [17, 19, 21]), (5, [24, 26, 28])]
CHANNELS = [64, 128, 256, 512, 512]
# LPIPS ScalingLayer constants (the ImageNet statistics, rescaled to [-1, 1] input).
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]


def state_dict(path):
    archive, prefix, obj = load_checkpoint(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: no state dict inside")
    return archive, prefix, sd


def take(path, sd_info, name, shape=None):
    archive, prefix, sd, cache = sd_info
    t = sd.get(name)
    if not isinstance(t, Tensor):
        raise ConvertError(f"{path}: missing tensor '{name}'")
    if shape is not None and tuple(t.size) != tuple(shape):
        raise ConvertError(f"{path}: '{name}' has shape {list(t.size)}, expected {list(shape)}")
    dtype, data = tensor_bytes(archive, prefix, t, cache)
    if dtype == "F16":
        n = len(data) // 2
        dtype, data = "F32", struct.pack(f"<{n}f", *struct.unpack(f"<{n}e", data))
    if dtype != "F32":
        raise ConvertError(f"{path}: '{name}' is {dtype}, expected a float tensor")
    return ("F32", tuple(t.size), data)


def vgg_shapes():
    """(slice, index, cin, cout) for every conv of the five slices."""
    cin, out = 3, []
    widths = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 17: 512, 19: 512, 21: 512, 24: 512, 26: 512, 28: 512}
    for s, idx in SLICES:
        for i in idx:
            out.append((s, i, cin, widths[i]))
            cin = widths[i]
    return out


def from_ckpt(path):
    archive, prefix, sd = state_dict(path)
    src = (archive, prefix, sd, {})
    p = "loss.perceptual_loss."
    tensors = collections.OrderedDict()
    for n in ("scaling_layer.shift", "scaling_layer.scale"):
        tensors[n] = take(path, src, p + n, (1, 3, 1, 1))
    for s, i, cin, cout in vgg_shapes():
        tensors[f"net.slice{s}.{i}.weight"] = take(path, src, f"{p}net.slice{s}.{i}.weight", (cout, cin, 3, 3))
        tensors[f"net.slice{s}.{i}.bias"] = take(path, src, f"{p}net.slice{s}.{i}.bias", (cout,))
    for l, c in enumerate(CHANNELS):
        tensors[f"lin{l}.model.1.weight"] = take(path, src, f"{p}lin{l}.model.1.weight", (1, c, 1, 1))
    return tensors


def from_vgg(vgg_path, lin_path):
    a, pre, sd = state_dict(vgg_path)
    vgg = (a, pre, sd, {})
    a2, pre2, sd2 = state_dict(lin_path)
    lin = (a2, pre2, sd2, {})
    tensors = collections.OrderedDict()
    tensors["scaling_layer.shift"] = ("F32", (1, 3, 1, 1), struct.pack("<3f", *SHIFT))
    tensors["scaling_layer.scale"] = ("F32", (1, 3, 1, 1), struct.pack("<3f", *SCALE))
    for s, i, cin, cout in vgg_shapes():
        tensors[f"net.slice{s}.{i}.weight"] = take(vgg_path, vgg, f"features.{i}.weight", (cout, cin, 3, 3))
        tensors[f"net.slice{s}.{i}.bias"] = take(vgg_path, vgg, f"features.{i}.bias", (cout,))
    for l, c in enumerate(CHANNELS):
        tensors[f"lin{l}.model.1.weight"] = take(lin_path, lin, f"lin{l}.model.1.weight", (1, c, 1, 1))
    return tensors


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from-ckpt", help="taming VQModel checkpoint holding loss.perceptual_loss.*")
    ap.add_argument("--vgg", help="torchvision VGG16 state dict (.pth)")
    ap.add_argument("--lin", help="LPIPS v0.1 lin layers for VGG (.pth)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    a = ap.parse_args()
    try:
        if a.from_ckpt and not (a.vgg or a.lin):
            tensors = from_ckpt(a.from_ckpt)
        elif a.vgg and a.lin and not a.from_ckpt:
            tensors = from_vgg(a.vgg, a.lin)
        else:
            raise ConvertError("give either --from-ckpt, or both --vgg and --lin")
        write_safetensors(a.out, tensors, {"format": "taming-lpips", "config": json.dumps({"target": "taming.modules.losses.lpips.LPIPS"})})
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
