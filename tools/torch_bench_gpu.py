#!/usr/bin/env python3
"""The reference's modules on a CUDA GPU, in float32 with TF32 off (the arithmetic this engine
does), for figures beside `taming bench` on the same GPU (tools/gpu_check.sh's machine):
VQGAN f16 (ImageNet config, random weights) encode + quantize + decode at 256², 512², 1024²;
the demo VQGAN's training step (weights/emoji_vqgan.yaml's model, batch 8 at 32², L1 +
codebook, Adam); GPT 12x512's training step (batch 8 x 256 tokens, AdamW). Medians of timed
runs after a warm-up, each ended by torch.cuda.synchronize(). Needs torch with CUDA and the
reference's code:

    TAMING_SRC=/path/to/taming-transformers python3 tools/torch_bench_gpu.py
"""
import os, sys, time, types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.environ.get("TAMING_SRC", "/tmp/taming-src"))
for m in ("requests", "tqdm", "transformers"):
    mod = types.ModuleType(m); mod.tqdm = None; mod.top_k_top_p_filtering = None; sys.modules.setdefault(m, mod)
from taming.modules.diffusionmodules.model import Encoder, Decoder  # noqa: E402
from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: E402
from taming.modules.transformer.mingpt import GPT  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
dev = torch.device("cuda")
print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__, "float32, TF32 off")


def timed(step, runs=5):
    step(); torch.cuda.synchronize()
    ts = []
    for _ in range(runs):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


dd = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
          ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
enc, dec = Encoder(**dd).eval().to(dev), Decoder(**dd).eval().to(dev)
q = VectorQuantizer2(1024, 256, 0.25).to(dev)
qc, pqc = torch.nn.Conv2d(256, 256, 1).to(dev), torch.nn.Conv2d(256, 256, 1).to(dev)
for size in (256, 512, 1024):
    x = torch.randn(1, 3, size, size, device=dev)
    torch.cuda.reset_peak_memory_stats()

    def infer():
        with torch.no_grad():
            z, _, _ = q(qc(enc(x)))
            dec(pqc(z))
    ms = timed(infer)
    print(f"VQGAN f16 encode+quantize+decode 1x{size}x{size}: {ms:.1f} ms, "
          f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
del enc, dec, q, qc, pqc

dd = dict(double_z=False, z_channels=64, resolution=32, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
enc, dec = Encoder(**dd).to(dev), Decoder(**dd).to(dev)
q = VectorQuantizer2(256, 32, 0.25).to(dev)
qc, pqc = torch.nn.Conv2d(64, 32, 1).to(dev), torch.nn.Conv2d(32, 64, 1).to(dev)
opt = torch.optim.Adam([p for m in (enc, dec, q, qc, pqc) for p in m.parameters()], lr=4e-4, betas=(0.5, 0.9))
x = torch.randn(8, 3, 32, 32, device=dev)


def vqgan_step():
    zq, cb, _ = q(qc(enc(x))); xr = dec(pqc(zq))
    loss = (x - xr).abs().mean() + cb
    opt.zero_grad(); loss.backward(); opt.step()
print(f"demo VQGAN train step, 32x32 batch 8: {timed(vqgan_step, 9):.2f} ms")

g = GPT(vocab_size=1024, block_size=256, n_layer=12, n_head=8, n_embd=512).to(dev)
opt = torch.optim.AdamW(g.parameters(), lr=1e-4, betas=(0.9, 0.95))
tokens = torch.randint(0, 1024, (8, 256), device=dev)


def gpt_step():
    logits, _ = g(tokens[:, :-1]); loss = F.cross_entropy(logits.reshape(-1, 1024), tokens[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
print(f"GPT 12x512 training step, batch 8 x 256 tokens: {timed(gpt_step, 9):.2f} ms")
