#!/usr/bin/env python3
"""The reference's VQGAN (ImageNet f16 config, random weights) on PyTorch CPU at one image size:
encode + quantize + decode time and the process's peak resident memory, to set beside
`taming bench vqgan --size N` (issue 22). Needs torch and the reference's code:

    TAMING_SRC=/path/to/taming-transformers python3 tools/torch_bench_sizes.py 1024 [runs]
"""
import os, resource, sys, time, types

import torch

sys.path.insert(0, os.environ.get("TAMING_SRC", "/tmp/taming-src"))
for m in ("requests", "tqdm", "transformers"):
    mod = types.ModuleType(m); mod.tqdm = None; mod.top_k_top_p_filtering = None; sys.modules.setdefault(m, mod)
from taming.modules.diffusionmodules.model import Encoder, Decoder  # noqa: E402
from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)
size = int(sys.argv[1])
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
dd = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
          ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
with torch.no_grad():
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    q = VectorQuantizer2(1024, 256, 0.25)
    qc, pqc = torch.nn.Conv2d(256, 256, 1), torch.nn.Conv2d(256, 256, 1)
    x = torch.randn(1, 3, size, size)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        z, _, _ = q(qc(enc(x)))
        y = dec(pqc(z))
        times.append(time.perf_counter() - t)
        del z, y
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"size {size}: encode+quantize+decode {sorted(times)[len(times) // 2]:.1f} s (median of {runs}), "
      f"peak resident {peak_mib:.0f} MiB")
