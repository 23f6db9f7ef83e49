#!/usr/bin/env python3
"""Grey maps of the emoji for the spatially conditioned demo (README "Demo"): each image
composited on white and converted to 8-bit grey (ITU-R 601 luma), same relative path and name.

    python3 tools/emoji_maps.py ../shared/data/emoji runs/emoji_grey

Needs Pillow (Debian: python3-pil).
"""
import os
import sys

from PIL import Image


def main(src, dst):
    n = 0
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if not f.lower().endswith((".png", ".jpg", ".jpeg")):
                continue
            img = Image.open(os.path.join(root, f)).convert("RGBA")
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            grey = Image.alpha_composite(white, img).convert("L")
            out = os.path.join(dst, os.path.relpath(root, src))
            os.makedirs(out, exist_ok=True)
            grey.save(os.path.join(out, os.path.splitext(f)[0] + ".png"))
            n += 1
    print(f"wrote {n} grey maps under {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
