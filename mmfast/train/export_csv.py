"""``python -m mmfast.train.export_csv OUT_DIR [--n N] [--image-size S] [--seed K]``: write the
procedural shapes dataset as PNG files plus an open_clip CSV (``filepath``/``title`` columns, tab
separated, as open_clip's ``--csv-separator`` default), for offline end-to-end runs of
open_clip_train (or of ``mmfast-train --train-data``)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from mmfast.train.data import ShapesDataset


def export(out: str | Path, n: int = 256, image_size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` scenes to ``out/images/*.png`` and ``out/train.csv``; return the CSV path."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ds = ShapesDataset(n, image_size=image_size, seed=seed, split="train")
    rows = []
    for start in range(0, n, 256):
        idx = list(range(start, min(n, start + 256)))
        imgs = (ds.render(idx) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, img in zip(idx, imgs):
            name = f"images/{i:06d}.png"
            Image.fromarray(img).save(out / name)
            rows.append((name, ds.captions[i]))
    path = out / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows((str((out / name).resolve()), cap) for name, cap in rows)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmfast.train.export_csv", description=__doc__)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.n < 1:
        p.error(f"--n must be >= 1, got {a.n}")
    print(export(a.out, a.n, a.image_size, a.seed))


if __name__ == "__main__":
    main()
