#!/usr/bin/env python3
"""Writes the reference's permuter orders (taming/modules/transformer/permuter.py)
as JSON, for tests/permuters.rs to compare the engine's constructions with:

    python3 tools/dump_permuters.py --reference-code path/to/taming-transformers --out tests/data/permuters.json

Needs torch and numpy (Debian: python3-torch); imports only permuter.py.
"""
import argparse
import importlib.util
import json
import os

ap = argparse.ArgumentParser()
ap.add_argument("--reference-code", required=True, help="a checkout of CompVis/taming-transformers")
ap.add_argument("--out", required=True)
a = ap.parse_args()
path = os.path.join(a.reference_code, "taming", "modules", "transformer", "permuter.py")
spec = importlib.util.spec_from_file_location("permuter", path)
permuter = importlib.util.module_from_spec(spec)
spec.loader.exec_module(permuter)

out = []
for name in ["Subsample", "ZCurve", "SpiralOut", "SpiralIn", "Random", "AlternateParsing"]:
    for size in [2, 4, 8, 16]:
        p = getattr(permuter, name)(size, size)
        out.append({"kind": name, "H": size, "W": size,
                    "forward": p.forward_shuffle_idx.tolist(), "backward": p.backward_shuffle_idx.tolist()})
# Non-square grids where the reference allows them.
for name, (h, w) in [("Random", (3, 5)), ("AlternateParsing", (3, 5))]:
    p = getattr(permuter, name)(h, w)
    out.append({"kind": name, "H": h, "W": w,
                "forward": p.forward_shuffle_idx.tolist(), "backward": p.backward_shuffle_idx.tolist()})
with open(a.out, "w") as f:
    json.dump(out, f)
print(f"wrote {a.out}: {len(out)} orders")
