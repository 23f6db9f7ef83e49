#!/usr/bin/env python3
"""Tests of tools/convert_taming.py against the fixtures' expected output
(run by tests/tools.rs): same names, dtypes, shapes, bytes and config."""

import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONVERT = os.path.join(HERE, "convert_taming.py")


def load(path):
    with open(path, "rb") as f:
        b = f.read()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    meta = header.pop("__metadata__", {})
    return header, meta, b[8 + n:]


def run(*args):
    return subprocess.run([sys.executable, CONVERT, *args], capture_output=True, text=True)


def main(fixtures):
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vqgan", "transformer"):
            d = os.path.join(fixtures, name)
            out = os.path.join(tmp, name + ".safetensors")
            r = run("--ckpt", os.path.join(d, "model.ckpt"), "--config", os.path.join(d, "model.yaml"), "--out", out)
            if r.returncode != 0:
                print(f"FAIL {name}: converter exited {r.returncode}: {r.stderr}")
                failures += 1
                continue
            got, gm, gd = load(out)
            want, wm, wd = load(os.path.join(d, "model.safetensors"))
            problems = []
            if set(got) != set(want):
                problems.append(f"names differ: {sorted(set(got) ^ set(want))[:5]}")
            for k in set(got) & set(want):
                g, w = got[k], want[k]
                if g["dtype"] != w["dtype"] or g["shape"] != w["shape"]:
                    problems.append(f"{k}: {g['dtype']}{g['shape']} vs {w['dtype']}{w['shape']}")
                elif gd[slice(*g["data_offsets"])] != wd[slice(*w["data_offsets"])]:
                    problems.append(f"{k}: bytes differ")
            if gm.get("format") != "taming" or json.loads(gm["config"]) != json.loads(wm["config"]):
                problems.append("metadata differs")
            print(("FAIL " if problems else "PASS ") + name + "".join("\n  " + p for p in problems[:10]))
            failures += bool(problems)
        # Bad input: clear one-line errors, no output file left behind.
        bad = os.path.join(tmp, "bad.safetensors")
        junk = os.path.join(tmp, "junk.ckpt")
        with open(junk, "wb") as f:
            f.write(b"not a checkpoint")
        vq = os.path.join(fixtures, "vqgan")
        tr = os.path.join(fixtures, "transformer")
        cases = [
            (("--ckpt", junk, "--config", os.path.join(vq, "model.yaml"), "--out", bad), "not a PyTorch checkpoint"),
            (("--ckpt", os.path.join(tr, "model.ckpt"), "--config", os.path.join(vq, "model.yaml"), "--out", bad), "not a taming.models.vqgan.VQModel"),
        ]
        unknown = os.path.join(tmp, "unknown.yaml")
        with open(unknown, "w") as f:
            f.write("model:\n  target: some.other.Model\n  params: {}\n")
        cases.append((("--ckpt", os.path.join(vq, "model.ckpt"), "--config", unknown, "--out", bad), "unknown target"))
        for args, expect in cases:
            r = run(*args)
            ok = r.returncode != 0 and expect in r.stderr and not os.path.exists(bad)
            print(("PASS " if ok else "FAIL ") + f"bad input -> '{expect}'" + ("" if ok else f": rc {r.returncode}, {r.stderr!r}"))
            failures += not ok
        # --half writes float16.
        half = os.path.join(tmp, "half.safetensors")
        r = run("--ckpt", os.path.join(vq, "model.ckpt"), "--config", os.path.join(vq, "model.yaml"), "--out", half, "--half")
        h, _, _ = load(half) if r.returncode == 0 else ({}, {}, b"")
        ok = r.returncode == 0 and h.get("encoder.conv_in.weight", {}).get("dtype") == "F16"
        print(("PASS " if ok else "FAIL ") + "--half")
        failures += not ok
        # LPIPS out of a VQModel checkpoint: the same values as the fixture's loss.perceptual_loss.*.
        lp = os.path.join(tmp, "lpips.safetensors")
        r = subprocess.run([sys.executable, os.path.join(HERE, "convert_lpips.py"), "--from-ckpt", os.path.join(vq, "model.ckpt"),
                            "--out", lp], capture_output=True, text=True)
        problems = [f"exit {r.returncode}: {r.stderr}"] if r.returncode else []
        if not r.returncode:
            got, _, gd = load(lp)
            want, _, wd = load(os.path.join(vq, "model.safetensors"))
            if len(got) != 33:
                problems.append(f"{len(got)} tensors, expected 33")
            for k, g in got.items():
                w = want.get("loss.perceptual_loss." + k)
                if w is None or g["shape"] != w["shape"]:
                    problems.append(f"{k}: missing or shape differs")
                    continue
                def floats(info, data):
                    b = data[slice(*info["data_offsets"])]
                    n = len(b) // (2 if info["dtype"] == "F16" else 4)
                    return struct.unpack(f"<{n}{'e' if info['dtype'] == 'F16' else 'f'}", b)
                if floats(g, gd) != floats(w, wd):
                    problems.append(f"{k}: values differ")
        r2 = subprocess.run([sys.executable, os.path.join(HERE, "convert_lpips.py"), "--vgg", junk, "--lin", junk, "--out", bad],
                            capture_output=True, text=True)
        if r2.returncode == 0 or "not a PyTorch checkpoint" not in r2.stderr or os.path.exists(bad):
            problems.append(f"junk input: rc {r2.returncode}, {r2.stderr!r}")
        print(("FAIL " if problems else "PASS ") + "lpips" + "".join("\n  " + p for p in problems[:10]))
        failures += bool(problems)
        if len(sys.argv) > 2 and not problems:
            os.replace(lp, sys.argv[2])  # for the Rust side to load
    print(f"{failures} failed")
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1]) else 0)
