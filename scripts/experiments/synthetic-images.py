#!/usr/bin/env python3
"""Plain synthetic images that are not footwear, for the out-of-distribution figures (docs/ood.md).

    python scripts/experiments/synthetic-images.py OUT [--per-kind 50] [--seed 29]

writes OUT/<kind>/<kind>-NNN.png for six kinds, seeded (the same files every run):
  noise     uniform RGB noise, each pixel on its own
  blobs     smooth noise: low-resolution noise scaled up (bicubic), like blurred colour patches
  flat      one flat colour
  gradient  a linear gradient between two colours, at a random angle
  stripes   stripes or a checkerboard of two colours, random period
  text      a few words (DejaVu or Liberation fonts) in a colour on a flat background

Needs numpy and Pillow (`pip install numpy pillow`); sizes vary from 160 to 640 px a side, so
that the runtime's resize is exercised too.
"""

import argparse
import glob
import os
import random
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "sale today only free delivery campus shop open monday friday order now ticket receipt "
    "hello world lorem ipsum dolor sit amet menu coffee tea price total thank you page one "
    "chapter notes exam room library bus stop 10:45 2026 invoice no. 4471 size colour"
).split()


def size(rng):
    return rng.randint(160, 640), rng.randint(160, 640)


def colour(rng):
    return tuple(rng.randint(0, 255) for _ in range(3))


def noise(rng, nprng):
    w, h = size(rng)
    return Image.fromarray(nprng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def blobs(rng, nprng):
    w, h = size(rng)
    cells = rng.randint(3, 12)
    small = nprng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def flat(rng, _):
    return Image.new("RGB", size(rng), colour(rng))


def gradient(rng, nprng):
    w, h = size(rng)
    a, b = np.array(colour(rng), float), np.array(colour(rng), float)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = x * np.cos(angle) + y * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1)
    px = a + (b - a) * t[..., None]
    return Image.fromarray(px.clip(0, 255).astype(np.uint8))


def stripes(rng, _):
    w, h = size(rng)
    a, b = np.array(colour(rng), np.uint8), np.array(colour(rng), np.uint8)
    period = rng.randint(4, 60)
    y, x = np.mgrid[0:h, 0:w]
    kind = rng.choice(["vertical", "horizontal", "checker"])
    if kind == "vertical":
        on = (x // period) % 2 == 0
    elif kind == "horizontal":
        on = (y // period) % 2 == 0
    else:
        on = ((x // period) + (y // period)) % 2 == 0
    return Image.fromarray(np.where(on[..., None], a, b))


def text(rng, _, fonts):
    w, h = size(rng)
    img = Image.new("RGB", (w, h), colour(rng))
    draw = ImageDraw.Draw(img)
    ink = colour(rng)
    lines = rng.randint(1, 6)
    pt = rng.randint(14, max(15, h // (lines + 1)))
    font = ImageFont.truetype(rng.choice(fonts), pt)
    y = rng.randint(0, max(1, h // 8))
    for _ in range(lines):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
        draw.text((rng.randint(0, max(1, w // 6)), y), words, fill=ink, font=font)
        y += int(pt * 1.3)
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-kind", type=int, default=50)
    ap.add_argument("--seed", type=int, default=29)
    args = ap.parse_args()
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/**/*.ttf", recursive=True))
    if not fonts:
        raise SystemExit("no TrueType fonts under /usr/share/fonts/truetype (apt install fonts-dejavu-core)")
    kinds = {
        "noise": noise,
        "blobs": blobs,
        "flat": flat,
        "gradient": gradient,
        "stripes": stripes,
        "text": lambda rng, nprng: text(rng, nprng, fonts),
    }
    for name, make in kinds.items():
        rng = random.Random(f"{args.seed}-{name}")
        nprng = np.random.default_rng([args.seed, zlib.crc32(name.encode())])
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        for i in range(args.per_kind):
            make(rng, nprng).save(os.path.join(args.out, name, f"{name}-{i:03}.png"))
    print(f"{len(kinds) * args.per_kind} images in {args.out}: {', '.join(kinds)} ({args.per_kind} each)")


if __name__ == "__main__":
    main()
