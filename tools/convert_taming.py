#!/usr/bin/env python3
"""Convert a taming-transformers checkpoint to a taming-wgpu model file.

    python3 tools/convert_taming.py --ckpt X.ckpt --config X.yaml --out X.safetensors [--half]

Reads the checkpoint's `state_dict` and the YAML config's `model:` block and
writes one .safetensors file: the state_dict tensors under their own names,
with `"format": "taming"` and `"config"` (the model block as JSON) in the
metadata (see SPEC.md). Works for the autoencoders (taming's VQModel, GumbelVQ
and VQSegmentationModel, latent-diffusion's VQModel; their loss.* weights,
LPIPS and discriminator, come along) and Net2NetTransformer checkpoints
(transformer + first_stage_model + cond_stage_model).

No PyTorch needed: the checkpoint's zip/pickle format is read with the
standard library (tensors are rebuilt from their storages); PyYAML reads
the config (`pip install pyyaml`).
"""

import argparse
import collections
import json
import os
import pickle
import struct
import sys
import zipfile

KNOWN_TARGETS = {"taming.models.vqgan.VQModel", "taming.models.vqgan.GumbelVQ", "taming.models.vqgan.VQSegmentationModel",
                 "ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.VQModelInterface",
                 "taming.models.cond_transformer.Net2NetTransformer"}

# storage class name -> (safetensors dtype, bytes per element, struct code)
STORAGES = {
    "FloatStorage": ("F32", 4, "f"), "HalfStorage": ("F16", 2, "e"), "DoubleStorage": ("F64", 8, "d"),
    "BFloat16Storage": ("BF16", 2, None), "LongStorage": ("I64", 8, "q"), "IntStorage": ("I32", 4, "i"),
    "ShortStorage": ("I16", 2, "h"), "CharStorage": ("I8", 1, "b"), "ByteStorage": ("U8", 1, "B"),
    "BoolStorage": ("BOOL", 1, "?"),
}


class ConvertError(Exception):
    pass


class StorageType:
    def __init__(self, name):
        self.name = name


class Storage:
    def __init__(self, kind, key):
        self.kind, self.key = kind, key


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class Opaque:
    """Stands in for any class the checkpoint pickles that is not a tensor (callbacks, configs...)."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return Opaque(*args)


def rebuild_tensor(storage, offset, size, stride, *rest):
    return Tensor(storage, offset, size, stride)


def rebuild_parameter(data, *rest):
    return data


class CheckpointUnpickler(pickle.Unpickler):
    def __init__(self, fh, archive, prefix):
        super().__init__(fh)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "torch" and name in STORAGES:
            return StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "dict", "list", "tuple", "slice"):
            return getattr(__import__("builtins"), name)
        return Opaque

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ConvertError(f"unexpected persistent id {pid!r}")
        kind = pid[1].name if isinstance(pid[1], StorageType) else str(pid[1])
        if kind not in STORAGES:
            raise ConvertError(f"unsupported tensor storage {kind}")
        return Storage(kind, pid[2])


def load_checkpoint(path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConvertError(f"{path}: not a PyTorch checkpoint (zip) file: {e}")
    pkls = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if not pkls:
        raise ConvertError(f"{path}: no data.pkl inside; is this a torch.save() checkpoint?")
    prefix = pkls[0][: -len("data.pkl")]
    with archive.open(pkls[0]) as fh:
        obj = CheckpointUnpickler(fh, archive, prefix).load()
    return archive, prefix, obj


def tensor_bytes(archive, prefix, t, cache):
    dtype, size, code = STORAGES[t.storage.kind]
    key = t.storage.key
    if key not in cache:
        cache[key] = archive.read(f"{prefix}data/{key}")
    data = cache[key]
    numel = 1
    for s in t.size:
        numel *= s
    # Row-major strides of a contiguous tensor.
    expect, acc = [], 1
    for s in reversed(t.size):
        expect.append(acc)
        acc *= s
    expect = tuple(reversed(expect))
    if numel == 0:
        return dtype, b""
    if all(st == ex for st, ex, sz in zip(t.stride, expect, t.size) if sz != 1):
        start = t.offset * size
        return dtype, data[start:start + numel * size]
    # Non-contiguous view: gather element by element.
    out = bytearray()
    idx = [0] * len(t.size)
    for _ in range(numel):
        pos = t.offset + sum(i * st for i, st in zip(idx, t.stride))
        out += data[pos * size:(pos + 1) * size]
        for d in reversed(range(len(idx))):
            idx[d] += 1
            if idx[d] < t.size[d]:
                break
            idx[d] = 0
    return dtype, bytes(out)


def to_half(data):
    n = len(data) // 4
    return struct.pack(f"<{n}e", *struct.unpack(f"<{n}f", data))


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for _, (_, _, data) in tensors.items():
            f.write(data)
    os.replace(tmp, path)  # no partial file on failure


def convert(ckpt, config_path, out, half=False):
    try:
        import yaml
    except ImportError:
        raise ConvertError("PyYAML is needed to read the config: pip install pyyaml")
    try:
        with open(config_path) as f:
            cfg = yaml.safe_load(f)
    except OSError as e:
        raise ConvertError(f"{config_path}: {e}")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ConvertError(f"{config_path}: no 'model:' block")
    model = cfg["model"]
    target = model.get("target")
    if target not in KNOWN_TARGETS:
        raise ConvertError(f"{config_path}: unknown target '{target}' (known: {', '.join(sorted(KNOWN_TARGETS))})")
    archive, prefix, obj = load_checkpoint(ckpt)
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if sd is None:
        raise ConvertError(f"{ckpt}: no 'state_dict' in the checkpoint")
    check_config(sd, model, config_path)
    cache, tensors = {}, collections.OrderedDict()
    for name, t in sd.items():
        if not isinstance(t, Tensor):
            continue
        dtype, data = tensor_bytes(archive, prefix, t, cache)
        if half and dtype == "F32":
            dtype, data = "F16", to_half(data)
        # 0-d tensors (BatchNorm's num_batches_tracked) are stored as [1].
        tensors[name] = (dtype, t.size or (1,), data)
    write_safetensors(out, tensors, {"format": "taming", "config": json.dumps(model)})
    return len(tensors)


def check_config(sd, model, config_path):
    """The weights must fit the config: a few shapes that the config decides."""
    p = model.get("params", {})
    checks = []
    if model["target"] != "taming.models.cond_transformer.Net2NetTransformer":
        dd = p.get("ddconfig", {})
        if model["target"].endswith("GumbelVQ"):
            checks.append(("quantize.embed.weight", (p.get("n_embed"), p.get("embed_dim"))))
            checks.append(("quantize.proj.weight", (p.get("n_embed"), dd.get("z_channels"), 1, 1)))
        else:
            checks.append(("quantize.embedding.weight", (p.get("n_embed"), p.get("embed_dim"))))
        checks.append(("encoder.conv_in.weight", (dd.get("ch"), dd.get("in_channels"), 3, 3)))
    else:
        tp = p.get("transformer_config", {}).get("params", {})
        checks.append(("transformer.tok_emb.weight", (tp.get("vocab_size"), tp.get("n_embd"))))
        checks.append(("transformer.pos_emb", (1, tp.get("block_size"), tp.get("n_embd"))))
    for name, want in checks:
        t = sd.get(name)
        if t is None:
            raise ConvertError(f"{config_path}: the checkpoint has no '{name}', so it is not a {model['target']}")
        if tuple(t.size) != tuple(want):
            raise ConvertError(f"{config_path}: '{name}' has shape {list(t.size)} but the config implies {list(want)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="reference checkpoint (.ckpt)")
    ap.add_argument("--config", required=True, help="reference YAML config")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--half", action="store_true", help="store float32 tensors as float16")
    a = ap.parse_args()
    try:
        n = convert(a.ckpt, a.config, a.out, a.half)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {a.out} ({n} tensors)")


if __name__ == "__main__":
    main()
