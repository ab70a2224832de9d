"""Datasets of the reference trainer: a procedural shapes dataset (the default) and image-text files.

Every dataset has ``len(ds)``, ``ds.captions`` (all captions, in order) and
``ds.batch(indices) -> (images [B, 3, S, S] float32, normalised, list of B captions)``. A batch
depends only on the indices, never on which process asks or what it asked before, which is what
makes data-parallel shards and resumed runs see exactly the same samples.

Procedural shapes (:class:`ShapesDataset`, no download)
    Each scene is one group of 1-3 identical shapes, or (80 %) two groups in a spatial relation:
    "two small red circles above a large blue square". Attributes: count (a/two/three), size
    (small/large), colour (red, green, blue, yellow, purple, white), shape (circle, square,
    triangle, diamond, cross), relation (above, below, left of, right of: the first group occupies
    that half of the image, the second the other half). The two groups of a scene never share both
    colour and shape. Objects sit in cells of a 4 x 4 grid with a random jitter, a slightly jittered
    radius and colour, on a random dark background, and are drawn anti-aliased with torch ops from
    per-scene attribute tables generated once from the seed (numpy), so a batch is rendered on the
    fly in a few milliseconds. The train and held-out splits use independent random streams of the
    same seed; held-out captions are unique, so retrieval has exactly one right answer (chance k/N).

Files (:class:`ImageTextFiles`)
    * open_clip's CSV format: one row per image, ``--csv-img-key`` (default ``filepath``) and
      ``--csv-caption-key`` (default ``title``) columns, ``--csv-separator`` (default: tab when the
      header line has a tab, else comma). Relative image paths are resolved against the CSV's folder.
    * a folder of images (png, jpg, jpeg, webp, bmp, gif; searched recursively) each with a caption in
      a ``.txt`` file of the same name next to it.
    Images are decoded with PIL when a batch asks for them: the shorter side resized to the image
    size (bicubic), then a centre crop. Missing files or columns, unreadable images and empty
    datasets raise :class:`DataError` naming the file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "DataError",
    "EpochSampler",
    "ImageTextFiles",
    "RELATIONS",
    "SHAPES",
    "ShapesDataset",
    "load_csv",
    "load_folder",
    "load_path",
    "split_train_val",
]

#: Normalisation of every image (OpenAI CLIP's mean and std).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

COLOURS = {
    "red": (0.90, 0.15, 0.13),
    "green": (0.15, 0.72, 0.22),
    "blue": (0.18, 0.35, 0.95),
    "yellow": (0.96, 0.88, 0.16),
    "purple": (0.62, 0.25, 0.86),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
COUNT_WORDS = ("a", "two", "three")
RELATIONS = ("above", "below", "left of", "right of")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class DataError(ValueError):
    """A dataset cannot be used; the message names the file."""


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------------
# procedural shapes


def _group_phrase(count: int, size: int, colour: int, shape: int) -> str:
    noun = SHAPES[shape] + ("es" if SHAPES[shape] == "cross" and count > 1 else "s" if count > 1 else "")
    return f"{COUNT_WORDS[count - 1]} {SIZES[size]} {list(COLOURS)[colour]} {noun}"


class ShapesDataset:
    """Procedural image-caption scenes (module docstring). Deterministic in ``(seed, split, n)``."""

    CELLS = 4  # the scene grid is CELLS x CELLS cells

    def __init__(self, n: int, image_size: int = 64, seed: int = 0, split: str = "train",
                 two_group_prob: float = 0.8):
        if n < 1:
            raise DataError(f"synthetic {split} split: need at least one sample, got {n}")
        if image_size < 16 or image_size % self.CELLS:
            raise DataError(f"synthetic dataset: the image size must be a multiple of {self.CELLS} and >= 16, "
                            f"got {image_size}")
        self.image_size, self.split = image_size, split
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        unique = split != "train"
        # held-out captions must be unique: draw extra scenes and keep the first n distinct captions
        draw = n if not unique else 2 * n + 64
        while True:
            attrs, captions = self._sample(rng, draw, two_group_prob)
            if not unique:
                keep = np.arange(n)
                break
            seen: dict[str, int] = {}
            for i, c in enumerate(captions):
                seen.setdefault(c, i)
                if len(seen) == n:
                    break
            if len(seen) == n:
                keep = np.fromiter(seen.values(), dtype=np.int64)
                break
            draw *= 2
            if draw > 64 * n + 4096:
                raise DataError(f"synthetic {split} split: cannot draw {n} distinct captions")
        self.captions = [captions[i] for i in keep]
        self._attrs = {k: torch.from_numpy(np.ascontiguousarray(v[keep])) for k, v in attrs.items()}

    def __len__(self) -> int:
        return len(self.captions)

    def _sample(self, rng: np.random.Generator, n: int, two_group_prob: float) -> tuple[dict, list[str]]:
        cells, cell = self.CELLS, self.image_size / self.CELLS
        two = rng.random(n) < two_group_prob
        count = rng.integers(1, 4, size=(n, 2))
        size = rng.integers(0, 2, size=(n, 2))
        colour = rng.integers(0, len(COLOURS), size=(n, 2))
        shape = rng.integers(0, len(SHAPES), size=(n, 2))
        clash = two & (colour[:, 0] == colour[:, 1]) & (shape[:, 0] == shape[:, 1])
        while clash.any():  # the two groups must differ in colour or shape
            m = int(clash.sum())
            colour[clash, 1] = rng.integers(0, len(COLOURS), size=m)
            shape[clash, 1] = rng.integers(0, len(SHAPES), size=m)
            clash = two & (colour[:, 0] == colour[:, 1]) & (shape[:, 0] == shape[:, 1])
        relation = rng.integers(0, len(RELATIONS), size=n)

        # regions: which cells each group may use
        row, col = np.divmod(np.arange(cells * cells), cells)
        top, left = row < cells // 2, col < cells // 2
        first_region = np.stack([top, ~top, left, ~left])  # [relation, cell]
        region = np.empty((n, 2, cells * cells), dtype=bool)
        region[:, 0] = np.where(two[:, None], first_region[relation], True)
        region[:, 1] = np.where(two[:, None], ~first_region[relation], False)
        keys = np.where(region, rng.random((n, 2, cells * cells)), np.inf)
        chosen = np.argsort(keys, axis=-1, kind="stable")[:, :, :3]  # [n, 2, 3] best cells per group
        slot = np.arange(3)
        valid = (slot[None, None, :] < count[:, :, None]) & np.stack([np.ones(n, bool), two], axis=1)[:, :, None]

        radius = np.where(size == 0, 0.22, 0.40)[:, :, None] * cell * rng.uniform(0.92, 1.08, size=(n, 2, 3))
        slack = np.maximum(cell / 2 - radius - 0.5, 0.0)
        cy = (chosen // cells + 0.5) * cell + rng.uniform(-1, 1, size=(n, 2, 3)) * slack
        cx = (chosen % cells + 0.5) * cell + rng.uniform(-1, 1, size=(n, 2, 3)) * slack
        palette = np.array(list(COLOURS.values()))
        rgb = np.clip(palette[colour][:, :, None, :] + rng.uniform(-0.06, 0.06, size=(n, 2, 3, 3)), 0, 1)
        background = rng.uniform(0.05, 0.28, size=(n, 1)) + rng.uniform(-0.04, 0.04, size=(n, 3))

        # at most one object per cell (groups use distinct cells of disjoint regions): store per cell
        n_cells = cells * cells
        cell_shape = np.full((n, n_cells), -1, dtype=np.int64)
        cell_center = np.zeros((n, n_cells, 2), dtype=np.float32)
        cell_radius = np.ones((n, n_cells), dtype=np.float32)
        cell_rgb = np.zeros((n, n_cells, 3), dtype=np.float32)
        scene, group, k = np.nonzero(valid)
        c = chosen[scene, group, k]
        cell_shape[scene, c] = shape[scene, group]
        cell_center[scene, c, 0] = cy[scene, group, k] - (c // cells) * cell
        cell_center[scene, c, 1] = cx[scene, group, k] - (c % cells) * cell
        cell_radius[scene, c] = radius[scene, group, k]
        cell_rgb[scene, c] = rgb[scene, group, k]
        attrs = {"shape": cell_shape, "center": cell_center, "radius": cell_radius, "rgb": cell_rgb,
                 "background": np.clip(background, 0, 1).astype(np.float32),
                 # the scene's class: the (shape, colour) of its first group
                 "class": (shape[:, 0] * len(COLOURS) + colour[:, 0]).astype(np.int64)}
        captions = []
        for i in range(n):
            first = _group_phrase(count[i, 0], size[i, 0], colour[i, 0], shape[i, 0])
            if two[i]:
                second = _group_phrase(count[i, 1], size[i, 1], colour[i, 1], shape[i, 1])
                captions.append(f"{first} {RELATIONS[relation[i]]} {second}")
            else:
                captions.append(first)
        return attrs, captions

    def render(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` in ``[0, 1]`` (not normalised)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        a = {k: v[idx] for k, v in self._attrs.items()}
        b, cells, cp = len(idx), self.CELLS, self.image_size // self.CELLS  # cp: pixels per cell side
        coords = torch.arange(cp, dtype=torch.float32) + 0.5
        dy = coords[None, None, :, None] - a["center"][:, :, 0, None, None]  # [B, cells^2, cp, 1]
        dx = (coords[None, None, None, :] - a["center"][:, :, 1, None, None]).abs()  # [B, cells^2, 1, cp]
        r = a["radius"][:, :, None, None]
        ady = dy.abs()
        dist = torch.stack([
            torch.sqrt(dx**2 + dy**2) - r,  # circle
            torch.maximum(dx, ady) - 0.85 * r,  # square
            torch.maximum(dy - 0.8 * r, (1.8 * dx - (dy + r)) / math.sqrt(1.8**2 + 1.0)),  # triangle, apex up
            (dx + ady - r) / math.sqrt(2.0),  # diamond
            torch.minimum(torch.maximum(dx - 0.33 * r, ady - r), torch.maximum(ady - 0.33 * r, dx - r)),  # cross
        ])  # [shapes, B, cells^2, cp, cp]
        shape = a["shape"]
        d = dist.gather(0, shape.clamp_min(0)[None, :, :, None, None].expand(1, -1, -1, cp, cp))[0]
        alpha = ((0.5 - d).clamp(0.0, 1.0) * (shape >= 0)[:, :, None, None])[:, :, None]  # [B, cells^2, 1, cp, cp]
        bg = a["background"][:, None, :, None, None]
        img = bg * (1 - alpha) + a["rgb"][:, :, :, None, None] * alpha  # [B, cells^2, 3, cp, cp]
        img = img.reshape(b, cells, cells, 3, cp, cp).permute(0, 3, 1, 4, 2, 5)
        return img.reshape(b, 3, cells * cp, cells * cp).contiguous()

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """Normalised images and captions of ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _normalise(self.render(idx)), [self.captions[i] for i in idx.tolist()]

    def classes(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The class of each scene, int64: its first group's (shape, colour), one of 30."""
        return self._attrs["class"][torch.as_tensor(indices, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------------
# image files


class ImageTextFiles:
    """Images on disk with their captions; ``source`` (the CSV or folder) is named in every error.

    Decoded, resized images are kept in memory as uint8 (up to :attr:`CACHE_BYTES`), so epochs after
    the first one do not decode again.
    """

    CACHE_BYTES = 2**30

    def __init__(self, paths: Sequence[Path], captions: Sequence[str], image_size: int, source: str):
        if len(paths) != len(captions):
            raise ValueError("paths and captions differ in length")
        if not paths:
            raise DataError(f"{source}: the dataset is empty (no image-caption pairs)")
        self.paths, self.captions = list(paths), list(captions)
        self.image_size, self.source = image_size, source
        self._cache: dict[int, torch.Tensor] = {}  # decoded uint8 images, up to CACHE_BYTES
        self._cache_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int], source: str | None = None) -> ImageTextFiles:
        """The samples at ``indices``, as a new dataset."""
        return ImageTextFiles([self.paths[i] for i in indices], [self.captions[i] for i in indices],
                              self.image_size, source or self.source)

    def load_image(self, i: int) -> torch.Tensor:
        """Sample ``i``'s image, ``[3, S, S]`` in ``[0, 1]``."""
        cached = self._cache.get(i)
        if cached is None:
            cached = self._decode(i)
            if self._cache_bytes + cached.numel() <= self.CACHE_BYTES:
                self._cache[i] = cached
                self._cache_bytes += cached.numel()
        return cached.float().div_(255.0)

    def _decode(self, i: int) -> torch.Tensor:
        """Sample ``i``'s image as uint8 ``[3, S, S]``."""
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.image_size / min(w, h)
                nw, nh = max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - self.image_size) // 2, (nh - self.image_size) // 2
                im = im.crop((left, top, left + self.image_size, top + self.image_size))
                arr = np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, ...)
            raise DataError(f"{self.source}: cannot read image {path}: {type(e).__name__}: {e}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def batch(self, indices: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, list[str]]:
        """Normalised images and captions of ``indices``."""
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        images = torch.stack([self.load_image(i) for i in idx])
        return _normalise(images), [self.captions[i] for i in idx]


def load_csv(path: str | Path, image_size: int, img_key: str = "filepath", caption_key: str = "title",
             separator: str | None = None) -> ImageTextFiles:
    """An open_clip-style CSV (module docstring). ``separator`` None: tab if the header has one, else comma."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the CSV file: {e}") from e
    if not text.strip():
        raise DataError(f"{path}: the CSV file is empty")
    header = text.splitlines()[0]
    sep = separator if separator is not None else ("\t" if "\t" in header else ",")
    if len(sep) != 1:
        raise DataError(f"{path}: the CSV separator must be one character, got {sep!r}")
    reader = csv.DictReader(io.StringIO(text), delimiter=sep)
    fields = reader.fieldnames or []
    missing = [k for k in (img_key, caption_key) if k not in fields]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the header has columns {fields} "
                        f"(separator {sep!r}). Set --csv-img-key / --csv-caption-key / --csv-separator.")
    root = path.parent
    paths, captions = [], []
    for line, row in enumerate(reader, start=2):
        file, caption = (row.get(img_key) or "").strip(), (row.get(caption_key) or "").strip()
        if not file or not caption:
            raise DataError(f"{path}, line {line}: empty {img_key if not file else caption_key!r} value")
        p = Path(file).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise DataError(f"{path}, line {line}: image file {p} does not exist")
        paths.append(p)
        captions.append(caption)
    if not paths:
        raise DataError(f"{path}: the CSV file has a header but no rows (empty dataset)")
    return ImageTextFiles(paths, captions, image_size, str(path))


def load_folder(path: str | Path, image_size: int) -> ImageTextFiles:
    """A folder of images with same-named ``.txt`` captions (module docstring)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files)")
    captions = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{root}: image {p} has no caption file {txt.name}")
        try:
            caption = txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{root}: cannot read caption file {txt}: {e}") from e
        if not caption:
            raise DataError(f"{root}: caption file {txt} is empty")
        captions.append(" ".join(caption.split()))
    return ImageTextFiles(images, captions, image_size, str(root))


def load_path(path: str | Path, image_size: int, img_key: str, caption_key: str,
              separator: str | None) -> ImageTextFiles:
    """A folder (:func:`load_folder`) or a CSV file (:func:`load_csv`)."""
    p = Path(path)
    if p.is_dir():
        return load_folder(p, image_size)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    return load_csv(p, image_size, img_key, caption_key, separator)


LABEL_KINDS = ("none", "caption", "class")


def batch_labels(ds, indices: torch.Tensor | Sequence[int], kind: str) -> torch.Tensor | None:
    """The contrastive labels of samples ``indices`` (the trainer's ``--labels``), int64, or None:

    * ``none``: None (each sample's only positive is its own caption);
    * ``caption``: samples with identical captions share a label (the caption's first index in the
      dataset, so every rank and every step agree);
    * ``class``: the procedural dataset's scene class (:meth:`ShapesDataset.classes`).
    """
    if kind == "none":
        return None
    idx = torch.as_tensor(indices, dtype=torch.long)
    if kind == "class":
        if not hasattr(ds, "classes"):
            raise DataError("--labels class needs the procedural dataset (its scenes' shape and colour classes); "
                            "image-text files carry no classes: use --labels caption")
        return ds.classes(idx)
    if kind != "caption":
        raise ValueError(f"labels kind must be one of {LABEL_KINDS}, got {kind!r}")
    ids = getattr(ds, "_caption_ids", None)
    if ids is None:
        first: dict[str, int] = {}
        ids = torch.tensor([first.setdefault(c, i) for i, c in enumerate(ds.captions)], dtype=torch.long)
        ds._caption_ids = ids
    return ids[idx]


def split_train_val(ds: ImageTextFiles, fraction: float, seed: int) -> tuple[ImageTextFiles, ImageTextFiles]:
    """A deterministic random split: ``max(2, round(fraction * n))`` held-out samples, the rest for training."""
    n = len(ds)
    n_val = max(2, round(fraction * n))
    if n - n_val < 1:
        raise DataError(f"{ds.source}: {n} samples are too few to hold out {n_val} for evaluation; "
                        "add data or pass --val-data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return (ds.subset(sorted(perm[n_val:]), ds.source + " (train split)"),
            ds.subset(sorted(perm[:n_val]), ds.source + " (held-out split)"))


class EpochSampler:
    """The global batches of a run: epoch ``e`` is a permutation drawn from ``(seed, e)``; a step's
    batch is a slice of it (the last incomplete batch of an epoch is dropped). Stateless in the
    step, so resumed and sharded runs see the same samples."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise DataError(f"the global batch size {batch_size} is larger than the training set ({n} samples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def global_batch(self, step: int) -> torch.Tensor:
        """Indices ``[batch_size]`` of step ``step`` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

    def shard(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        """This rank's contiguous slice of step ``step``'s global batch."""
        local = self.batch_size // world_size
        return self.global_batch(step)[rank * local:(rank + 1) * local]
