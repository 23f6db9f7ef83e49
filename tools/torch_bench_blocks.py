#!/usr/bin/env python3
"""PyTorch CPU training-step times of the blocks `taming bench train` times, to set beside it
(issue 23): the reference's ResnetBlock (128 channels, 1x128x32x32) and a minGPT block (256
tokens, 512 wide, 8 heads), loss mean(y^2), AdamW, 2 threads. Needs torch and the reference's
code (install libopenblas0-pthread first: Debian's reference BLAS makes linear layers 10-25x
slower):

    TAMING_SRC=/path/to/taming-transformers python3 tools/torch_bench_blocks.py [runs]
"""
import os, sys, time, types

import torch

sys.path.insert(0, os.environ.get("TAMING_SRC", "/tmp/taming-src"))
for m in ("requests", "tqdm", "transformers"):
    mod = types.ModuleType(m); mod.tqdm = None; mod.top_k_top_p_filtering = None; sys.modules.setdefault(m, mod)
from taming.modules.diffusionmodules.model import ResnetBlock  # noqa: E402
from taming.modules.transformer.mingpt import Block, GPTConfig  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
torch.manual_seed(0)
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def median_step_ms(module, x):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step():
        y = module(x)
        loss = (y * y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


class ResnetOnly(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, None)


resnet = ResnetOnly(ResnetBlock(in_channels=128, out_channels=128, temb_channels=0, dropout=0.0))
print(f"ResnetBlock 128ch on 1x128x32x32 training step: {median_step_ms(resnet, torch.randn(1, 128, 32, 32)):.1f} ms")
cfg = GPTConfig(vocab_size=16, block_size=256, n_layer=1, n_head=8, n_embd=512,
                embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
print(f"GPT block (256 tokens, 512 wide, 8 heads) training step: {median_step_ms(Block(cfg), torch.randn(1, 256, 512)):.1f} ms")
