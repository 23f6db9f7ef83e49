#!/usr/bin/env python3
"""Runs the PyTorch reference on a checkpoint and images and writes what
`taming verify` checks, so users can confirm parity of their own models on
their own GPU:

    python3 tools/dump_reference.py --ckpt X.ckpt --config X.yaml --images a.png b.png --out DIR
    taming verify DIR

DIR gets `reference.safetensors` (the tensors of ../shared/SPEC.md, section
"Parity fixtures") and `model.safetensors` (the converted checkpoint, as
tools/convert_taming.py writes it). Needs torch, torchvision and the reference
package `taming` (CompVis/taming-transformers: put its checkout on PYTHONPATH
or pass --reference-code DIR). pytorch_lightning and the repository's
main.py are not needed, nor transformers (used by mingpt for top-p sampling
only): minimal stand-ins are used when they are missing. No
downloads: LPIPS's VGG and lin weights come from the checkpoint.

VQModel: input, encoder_out, quant_conv_out, indices, z_q, codebook_loss,
decoder_out, rec_l1, grad.* (of rec_l1 + codebook_loss); VQSegmentationModel
with BCELossWithQuant: the same without grad.*, with input_labels, bce_loss,
ae_loss and ae_grad.* (its objective); GumbelVQ (eval, the noise-free argmax
choice): input, encoder_out, quant_conv_out, quant_logits, indices, z_q,
codebook_loss (the KL term), decoder_out, rec_l1; with a
VQLPIPSWithDiscriminator loss also lpips, nll_loss, disc_logits_fake, g_loss,
d_weight, ae_loss, ae_grad.*, disc_logits_real, disc_logits_fake_detached,
d_loss, d_grad.* — train mode (BatchNorm on batch statistics), the
discriminator switched on (global step = disc_start), LPIPS without dropout.
Net2NetTransformer (eval mode): image, z_indices, c_indices, logits,
ce_loss, grad.transformer.*, greedy_indices, greedy_image; conditioned ones
add cond_image (the cond stage's input: photo, map, one-hot labels or
coordinates) and cond_labels (label-map ids), or class_label.
"""

import argparse
import json
import os
import struct
import sys
import types


class DumpError(Exception):
    pass


def import_reference(code_dir):
    """Import torch and the reference package, with stand-ins for what it
    imports but does not need here."""
    if code_dir:
        sys.path.insert(0, os.path.abspath(code_dir))
    try:
        import torch
        import torchvision
    except ImportError as e:
        raise DumpError(f"torch and torchvision are needed ({e}); e.g. apt install python3-torch python3-torchvision")
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    try:
        from main import instantiate_from_config  # noqa: F401
    except Exception:
        import importlib

        def get_obj_from_str(string):
            module, cls = string.rsplit(".", 1)
            return getattr(importlib.import_module(module), cls)

        def instantiate_from_config(config):
            if "target" not in config:
                raise KeyError("Expected key `target` to instantiate.")
            return get_obj_from_str(config["target"])(**config.get("params", dict()))

        main = types.ModuleType("main")
        main.instantiate_from_config = instantiate_from_config
        main.get_obj_from_str = get_obj_from_str
        sys.modules["main"] = main
    try:
        import transformers  # noqa: F401  (mingpt imports top_k_top_p_filtering for top-p sampling only)
    except ImportError:
        hf = types.ModuleType("transformers")

        def top_k_top_p_filtering(*args, **kwargs):
            raise DumpError("top-p sampling needs the 'transformers' package")

        hf.top_k_top_p_filtering = top_k_top_p_filtering
        sys.modules["transformers"] = hf
    # LPIPS builds torchvision's VGG16 with pretrained weights and then loads
    # its lin layers from a download; the checkpoint carries both.
    original_vgg16 = torchvision.models.vgg16

    def vgg16_without_download(*args, **kwargs):
        kwargs.pop("pretrained", None)
        kwargs.pop("weights", None)
        return original_vgg16()

    torchvision.models.vgg16 = vgg16_without_download
    try:
        import taming.modules.losses.lpips as lpips
    except ImportError as e:
        raise DumpError(f"the reference package 'taming' is not importable ({e}); "
                        "pass --reference-code PATH_TO/taming-transformers")
    lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    from main import instantiate_from_config
    return torch, instantiate_from_config


def without_ckpt_paths(cfg):
    """The checkpoint holds every stage: nested configs must not load files."""
    if isinstance(cfg, dict):
        return {k: without_ckpt_paths(v) for k, v in cfg.items() if k != "ckpt_path"}
    if isinstance(cfg, list):
        return [without_ckpt_paths(v) for v in cfg]
    return cfg


def load_images(torch, paths, size):
    """RGB in [-1, 1], shortest side resized to `size`, centre crop (the
    reference's validation pipeline)."""
    from PIL import Image
    out = []
    for p in paths:
        try:
            img = Image.open(p).convert("RGB")
        except Exception as e:
            raise DumpError(f"{p}: not a readable image ({e})")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        data = torch.tensor(list(img.getdata()), dtype=torch.float32).reshape(size, size, 3)
        out.append(data.permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def fit_square(img, size, resample):
    """Shortest side resized to `size` (if it is not), then the centre size x size crop."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
    w, h = img.size
    return img.crop(((w - size) // 2, (h - size) // 2, (w - size) // 2 + size, (h - size) // 2 + size))


def load_maps(torch, paths, size):
    """One-channel maps in [-1, 1] as taming-wgpu reads them: an RGBA PNG is depth in the
    reference's format (float32 per pixel, min-max normalised), a grey PNG is taken as it is."""
    import numpy as np
    from PIL import Image
    out = []
    for p in paths:
        img = Image.open(p)
        if img.mode == "RGBA":
            d = np.array(img).view(np.float32).reshape(img.size[1], img.size[0])
            d = 2.0 * (d - d.min()) / max(1e-8, d.max() - d.min()) - 1.0
        elif img.mode in ("I;16", "I"):
            d = np.array(img).astype(np.float32) / 32767.5 - 1.0
        else:
            d = np.array(img.convert("L")).astype(np.float32) / 127.5 - 1.0
        m = fit_square(Image.fromarray(d.astype(np.float32), mode="F"), size, Image.BILINEAR)
        out.append(torch.tensor(np.array(m), dtype=torch.float32)[None])
    return torch.stack(out)


def load_labels(torch, paths, size, n_labels):
    """Label maps (single-channel PNGs, pixel = class id), nearest-resized: (one-hot [B, n, H, W], ids)."""
    import numpy as np
    from PIL import Image
    ids = []
    for p in paths:
        img = Image.open(p)
        if img.mode not in ("L", "I;16", "I"):
            raise DumpError(f"{p}: a label map must be a single-channel PNG, not {img.mode}")
        img = fit_square(img, size, Image.NEAREST)
        a = np.array(img).astype(np.int64)
        if a.max() >= n_labels:
            raise DumpError(f"{p}: label {a.max()} is outside the model's {n_labels} labels")
        ids.append(torch.tensor(a))
    ids = torch.stack(ids)
    return torch.nn.functional.one_hot(ids, n_labels).permute(0, 3, 1, 2).float(), ids


def load_inputs(torch, model, paths, size):
    """What an autoencoder reads: photos, one-channel maps, or one-hot label maps."""
    if type(model).__name__ == "VQSegmentationModel":
        return load_labels(torch, paths, size, model.colorize.shape[1])
    if model.encoder.conv_in.in_channels == 1:
        return load_maps(torch, paths, size), None
    return load_images(torch, paths, size), None


def read_tensor(path, name):
    """One F32 tensor from a safetensors file (to reuse an earlier input)."""
    import torch
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        if name not in header:
            raise DumpError(f"{path}: no tensor '{name}'")
        info = header[name]
        if info["dtype"] != "F32":
            raise DumpError(f"{path}: '{name}' is {info['dtype']}, expected F32")
        a, b = info["data_offsets"]
        f.seek(8 + n + a)
        data = f.read(b - a)
    count = (b - a) // 4
    return torch.tensor(struct.unpack(f"<{count}f", data), dtype=torch.float32).reshape(info["shape"])


def write_reference(path, tensors):
    """F32 and I64 tensors, atomically (tools/convert_taming.py's writer)."""
    import torch
    from convert_taming import write_safetensors
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype in (torch.int64, torch.int32):
            dtype, t = "I64", t.to(torch.int64)
        else:
            dtype, t = "F32", t.to(torch.float32)
        out[name] = (dtype, list(t.shape) or [1], t.numpy().tobytes())
    write_safetensors(path, out, {"format": "taming-reference"})


def dump_gumbel(torch, model, x):
    """GumbelVQ without its noise: the argmax of the logits (what taming-wgpu computes)."""
    model.eval()
    q = model.quantize
    with torch.no_grad():
        h = model.encoder(x)
        hq = model.quant_conv(h)
        logits = q.proj(hq)
        indices = logits.argmax(dim=1)
        z_q = q.embed.weight[indices].permute(0, 3, 1, 2).contiguous()
        qy = torch.softmax(logits, dim=1)
        kl = q.kl_weight * torch.sum(qy * torch.log(qy * q.n_embed + 1e-10), dim=1).mean()
        dec = model.decode(z_q)
    return {"input": x, "encoder_out": h, "quant_conv_out": hq, "quant_logits": logits, "indices": indices,
            "z_q": z_q, "codebook_loss": kl.reshape(1), "decoder_out": dec,
            "rec_l1": torch.mean(torch.abs(x - dec)).reshape(1)}


def dump_vqgan(torch, model, x):
    out = {"input": x}
    model.train()
    loss = getattr(model, "loss", None)
    has_gan = loss is not None and hasattr(loss, "discriminator") and hasattr(loss, "perceptual_loss")
    if has_gan:
        loss.perceptual_loss.eval()  # parity is checked without LPIPS's dropout
    ae_params = [(n, p) for n, p in model.named_parameters() if not n.startswith("loss.")]
    for _, p in ae_params:
        p.requires_grad_(True)
    h = model.encoder(x)
    hq = model.quant_conv(h)
    z_q, codebook_loss, (_, _, indices) = model.quantize(hq)
    dec = model.decode(z_q)
    rec_l1 = torch.mean(torch.abs(x - dec))
    out.update(encoder_out=h, quant_conv_out=hq, z_q=z_q, codebook_loss=codebook_loss.reshape(1),
               indices=indices.reshape(x.shape[0], z_q.shape[2], z_q.shape[3]), decoder_out=dec, rec_l1=rec_l1.reshape(1))
    # grad.* of rec_l1 + codebook_loss; a segmentation VQGAN's are of its own objective (ae_grad.*).
    segmentation = type(loss).__name__ == "BCELossWithQuant"
    grads = [] if segmentation else torch.autograd.grad(rec_l1 + codebook_loss, [p for _, p in ae_params],
                                                        retain_graph=True, allow_unused=True)
    for (n, _), g in zip(ae_params, grads):
        if g is not None:
            out[f"grad.{n}"] = g
    if segmentation:
        # A segmentation VQGAN's objective: BCE of the logits against the one-hot map + the codebook loss.
        ae_loss, log = loss(codebook_loss, x, dec, split="train")
        out.update(ae_loss=ae_loss.reshape(1), bce_loss=log["train/bce_loss"].reshape(1))
        grads = torch.autograd.grad(ae_loss, [p for _, p in ae_params], allow_unused=True)
        for (n, _), g in zip(ae_params, grads):
            if g is not None:
                out[f"ae_grad.{n}"] = g
    if not has_gan:
        return out
    step = loss.discriminator_iter_start  # the discriminator switched on (factor 1)
    out["lpips"] = loss.perceptual_loss(x.contiguous(), dec.contiguous()).reshape(x.shape[0])
    ae_loss, log = loss(codebook_loss, x, dec, 0, step, last_layer=model.get_last_layer(), split="train")
    out.update(ae_loss=ae_loss.reshape(1), nll_loss=log["train/nll_loss"].reshape(1),
               g_loss=log["train/g_loss"].reshape(1), d_weight=log["train/d_weight"].reshape(1),
               disc_logits_fake=loss.discriminator(dec.contiguous()))
    grads = torch.autograd.grad(ae_loss, [p for _, p in ae_params], retain_graph=True, allow_unused=True)
    for (n, _), g in zip(ae_params, grads):
        if g is not None:
            out[f"ae_grad.{n}"] = g
    d_params = [(n, p) for n, p in model.named_parameters() if n.startswith("loss.discriminator.")]
    d_loss, _ = loss(codebook_loss, x, dec, 1, step, last_layer=model.get_last_layer(), split="train")
    out.update(d_loss=d_loss.reshape(1), disc_logits_real=loss.discriminator(x.contiguous().detach()),
               disc_logits_fake_detached=loss.discriminator(dec.contiguous().detach()))
    grads = torch.autograd.grad(d_loss, [p for _, p in d_params], allow_unused=True)
    for (n, _), g in zip(d_params, grads):
        if g is not None:
            out[f"d_grad.{n}"] = g
    return out


def dump_transformer(torch, model, x, c):
    import torch.nn.functional as F
    model.eval()
    out = {"image": x}
    quant_z, z_indices = model.encode_to_z(x)
    _, c_indices = model.encode_to_c(c[0] if isinstance(c, tuple) else c)
    params = [(n, p) for n, p in model.named_parameters() if n.startswith("transformer.")]
    for _, p in params:
        p.requires_grad_(True)
    cz = torch.cat((c_indices, z_indices), dim=1)
    logits, _ = model.transformer(cz[:, :-1])
    logits = logits[:, c_indices.shape[1] - 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), z_indices.reshape(-1))
    out.update(z_indices=z_indices, c_indices=c_indices, logits=logits, ce_loss=ce.reshape(1))
    # The conditioning as given: the cond stage's input (a photo, a map, a one-hot label map,
    # coordinates) or class labels; label maps also as their ids.
    stage = type(model.cond_stage_model).__name__
    if isinstance(c, tuple):
        c, out["cond_labels"] = c
    if stage != "SOSProvider" and c.is_floating_point() and c.dim() == 4:
        out["cond_image"] = c
    elif c.dim() == 1:
        out["class_label"] = c
    for (n, _), g in zip(params, torch.autograd.grad(ce, [p for _, p in params], allow_unused=True)):
        if g is not None:
            out[f"grad.{n}"] = g
    with torch.no_grad():
        steps = z_indices.shape[1]
        greedy = model.sample(z_indices[:, :0], c_indices, steps=steps, sample=False)
        out["greedy_indices"] = greedy
        out["greedy_image"] = model.decode_to_img(greedy, quant_z.shape)
    return out


def condition(torch, model, args, x):
    """The `c` that the model's cond stage encodes."""
    stage = type(model.cond_stage_model).__name__
    if stage == "SOSProvider":
        return x
    if stage == "Labelator":
        if not args.classes or len(args.classes) != x.shape[0]:
            raise DumpError(f"a class-conditional model: give --class with one label per image ({x.shape[0]})")
        return torch.tensor(args.classes, dtype=torch.int64)
    if stage == "CoordStage":
        # FacesHQ's coordinates of the whole image: (y W + x) / (H W).
        b, _, h, w = x.shape
        return (torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w) / (h * w)).float().repeat(b, 1, 1, 1)
    if not args.cond or len(args.cond) != x.shape[0]:
        raise DumpError(f"a model conditioned by {stage}: give --cond with one condition image per image ({x.shape[0]})")
    c, labels = load_inputs(torch, model.cond_stage_model, args.cond, x.shape[-1])
    return c if labels is None else (c, labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="reference checkpoint (.ckpt)")
    ap.add_argument("--config", required=True, help="reference YAML config")
    ap.add_argument("--images", nargs="+", help="input images (a batch)")
    ap.add_argument("--input-from", metavar="SAFETENSORS",
                    help="take the input batch ('input' or 'image') from an earlier reference.safetensors")
    ap.add_argument("--size", type=int, default=256, help="crop size for --images (default 256)")
    ap.add_argument("--class", dest="classes", type=int, nargs="+", help="class labels (class-conditional transformers)")
    ap.add_argument("--cond", nargs="+", help="condition images (transformers with a VQGAN cond stage)")
    ap.add_argument("--reference-code", metavar="DIR", help="a taming-transformers checkout (if 'taming' is not importable)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--no-model", action="store_true", help="do not write DIR/model.safetensors")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from convert_taming import ConvertError
    try:
        if bool(args.images) == bool(args.input_from):
            raise DumpError("give either --images or --input-from")
        torch, instantiate_from_config = import_reference(args.reference_code)
        import yaml
        with open(args.config) as f:
            cfg = yaml.safe_load(f)
        if not isinstance(cfg, dict) or "model" not in cfg:
            raise DumpError(f"{args.config}: no 'model:' block")
        target = cfg["model"].get("target", "")
        model = instantiate_from_config(without_ckpt_paths(cfg["model"]))
        try:
            obj = torch.load(args.ckpt, map_location="cpu")
        except OSError:
            raise
        except Exception as e:
            raise DumpError(f"{args.ckpt}: not a readable torch checkpoint ({e})")
        sd = obj.get("state_dict") if isinstance(obj, dict) else None
        if sd is None:
            raise DumpError(f"{args.ckpt}: no 'state_dict' in the checkpoint")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # A permuter's index buffers are built from its config (H, W): files written
        # by tools/export_ckpt.py do not carry them.
        missing = [m for m in missing if not m.startswith("permuter.")]
        if missing:
            raise DumpError(f"{args.ckpt}: the config expects tensors the checkpoint lacks: {', '.join(missing[:5])}")
        if unexpected:
            print(f"note: {len(unexpected)} checkpoint tensors unused by the config ({', '.join(unexpected[:3])} ...)")
        torch.manual_seed(0)
        if target.endswith(("VQModel", "VQSegmentationModel", "GumbelVQ")):
            labels = None
            if args.input_from:
                x = read_tensor(args.input_from, "input")
            else:
                x, labels = load_inputs(torch, model, args.images, args.size)
            tensors = dump_gumbel(torch, model, x) if target.endswith("GumbelVQ") else dump_vqgan(torch, model, x)
            if labels is not None:
                tensors["input_labels"] = labels
        elif target.endswith("Net2NetTransformer"):
            x = read_tensor(args.input_from, "image") if args.input_from else load_images(torch, args.images, args.size)
            tensors = dump_transformer(torch, model, x, condition(torch, model, args, x))
        else:
            raise DumpError(f"{args.config}: unknown target '{target}' (an autoencoder or Net2NetTransformer)")
        os.makedirs(args.out, exist_ok=True)
        write_reference(os.path.join(args.out, "reference.safetensors"), tensors)
        if not args.no_model:
            from convert_taming import convert
            convert(args.ckpt, args.config, os.path.join(args.out, "model.safetensors"))
        print(f"wrote {args.out}/reference.safetensors ({len(tensors)} tensors)"
              + ("" if args.no_model else f" and {args.out}/model.safetensors"))
    except (DumpError, ConvertError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
