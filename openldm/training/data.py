"""Training data: captioned image sources, transforms, and a batch order that resumes exactly.

Every random choice (epoch order, crop, flip, caption dropout) is a pure function of the run seed
and the sample's global position in the stream. A resumed run therefore sees exactly the batches
an uninterrupted run would, with no loader state to save, and a rank of a multi-process run takes
its own slice of each global batch.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from openldm.data.phrasing import caption, vocabulary
from openldm.data.shapes import ShapesConfig, ShapesDataset
from openldm.models.domain import prompt_words
from openldm.training.buckets import BucketPlan, Size, bucket_sizes, fit_to_bucket
from openldm.training.config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """A dataset that cannot be trained on (missing folder, no images, no captions)."""


@dataclass(frozen=True)
class Example:
    image: Image.Image
    caption: str


class ShapesSource:
    """The procedural shapes dataset as a training source."""

    def __init__(self, config: DataConfig):
        shapes = ShapesConfig(image_size=config.image_size, two_shape_fraction=config.two_shape_fraction)
        self.dataset = ShapesDataset(config.length, shapes, seed=config.seed)
        self.style = config.captions

    def caption(self, index: int, rng: random.Random) -> str:
        """Image `index` captioned in the configured style (`rng` picks the varied grammar's forms)."""
        return caption(self.dataset.scene(index)[0], rng, self.style)

    def words(self) -> frozenset[str]:
        """Every word the captions can contain."""
        return vocabulary(self.style)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Example | None:
        image, caption, _ = self.dataset[index]
        return Example(image, caption)

    def describe(self) -> str:
        return f"shapes(length={len(self)}, seed={self.dataset.seed}, size={self.dataset.config.image_size})"


def _captions_from_jsonl(folder: Path) -> dict[Path, str]:
    captions: dict[Path, str] = {}
    for meta in sorted(folder.rglob("metadata.jsonl")):
        for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                caption = row.get("text", row.get("caption", ""))
                captions[(meta.parent / row["file_name"]).resolve()] = str(caption)
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f"{meta}:{number}: bad metadata line ({error})") from None
    return captions


class FolderSource:
    """Images under a folder (recursive) with `name.txt` captions or `metadata.jsonl` rows.

    Unreadable images are skipped when first met, counted, and reported in one warning each time
    the count grows by a power of two: a bad file never stops an epoch.
    """

    def __init__(self, config: DataConfig):
        folder = Path(config.path or "")
        if not folder.is_dir():
            raise DataError(f"{folder}: the image folder does not exist")
        jsonl = _captions_from_jsonl(folder)
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        self.captions = [self._caption(p, jsonl) for p in self.files]
        self.folder = folder
        self.skipped: set[int] = set()

    def words(self) -> frozenset[str]:
        """Every word the captions contain."""
        return prompt_words(self.captions)

    @staticmethod
    def _caption(image: Path, jsonl: dict[Path, str]) -> str:
        text = image.with_suffix(".txt")
        if text.is_file():
            return text.read_text(encoding="utf-8").strip()
        return jsonl.get(image.resolve(), "")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Example | None:
        if index in self.skipped:
            return None
        try:
            with Image.open(self.files[index]) as image:
                return Example(image.convert("RGB"), self.captions[index])
        except (OSError, UnidentifiedImageError, ValueError):
            self._skip(index)
            return None

    def size(self, index: int) -> Size | None:
        """(width, height) from the file's header, None (and skipped) when it cannot be read."""
        if index in self.skipped:
            return None
        try:
            with Image.open(self.files[index]) as image:
                return image.size
        except (OSError, UnidentifiedImageError, ValueError):
            self._skip(index)
            return None

    def _skip(self, index: int) -> None:
        self.skipped.add(index)
        count = len(self.skipped)
        if count & (count - 1) == 0:
            warnings.warn(f"{self.folder}: skipped {count} unreadable image(s), e.g. {self.files[index]}",
                          stacklevel=3)

    def describe(self) -> str:
        return f"folder({self.folder}, {len(self)} images)"


def make_source(config: DataConfig) -> ShapesSource | FolderSource:
    return ShapesSource(config) if config.source == "shapes" else FolderSource(config)


def sample_rng(seed: int, position: int, purpose: str) -> random.Random:
    """The random stream of one sample at one position of the training stream."""
    return random.Random(f"{seed}:{purpose}:{position}")


def hash_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process)."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


class EpochOrder:
    """Positions -> dataset indices, caching the current epoch's permutation."""

    def __init__(self, seed: int, length: int):
        self.seed, self.length = seed, length
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.length)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=generator)
        return int(self._perm[offset])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def transform(image: Image.Image, config: DataConfig, rng: random.Random) -> torch.Tensor:
    """Resize the shorter side to `image_size`, crop (square, `crop_size` if set), maybe flip."""
    size = config.image_size
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    crop = config.crop_size or size
    w, h = image.size
    if config.random_crop or config.crop_size:
        left, top = rng.randint(0, w - crop), rng.randint(0, h - crop)
    else:
        left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    if config.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


@dataclass
class Batch:
    images: torch.Tensor | None  # (B, 3, H, W) in [-1, 1], or None when latents are cached
    captions: list[str]
    indices: list[int]
    positions: list[int]


class BatchStream:
    """Batch `step` of a run: positions step*global_batch + rank*batch_size ... of the sample stream.

    Unreadable samples are replaced by the next readable position beyond the stream's end of
    this step (deterministic, so resume stays exact). With `buckets`, a `BucketPlan` chooses each
    global batch instead, and a rank takes its slice of it.
    """

    def __init__(self, source, config: DataConfig, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 load_images: bool = True):
        self.source, self.config, self.seed = source, config, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.load_images = load_images
        self.order = EpochOrder(seed, len(source))
        self.plan = self._bucket_plan() if config.buckets else None

    def _bucket_plan(self) -> BucketPlan:
        sizes = [self.source.size(i) for i in range(len(self.source))]
        buckets = bucket_sizes(self.config.image_size, self.config.bucket_step)
        plan = BucketPlan(sizes, buckets, self.seed, self.batch_size * self.world)
        if not plan.per_epoch:
            raise DataError(f"{self.source.describe()}: no bucket holds a whole batch of "
                            f"{self.batch_size * self.world} images; lower run.batch_size")
        return plan

    def positions(self, step: int) -> Sequence[int]:
        start = step * self.batch_size * self.world + self.rank * self.batch_size
        return range(start, start + self.batch_size)

    def __call__(self, step: int) -> Batch:
        if self.plan is not None:
            return self._bucketed(step)
        images, captions, indices, positions = [], [], [], []
        for position in self.positions(step):
            index, example, tries = self.order(position), None, 0
            while self.load_images and example is None:
                index = self.order(position + tries * 7919) if tries else index
                example = self.source[index]
                tries += 1
                if tries > 100:
                    raise DataError(f"{self.source.describe()}: 100 unreadable images in a row")
            rng = sample_rng(self.seed, position, "sample")
            caption = self.source_caption(index, position)
            if self.load_images:
                images.append(transform(example.image, self.config, rng))
            if rng.random() < self.config.caption_dropout:
                caption = ""
            captions.append(caption)
            indices.append(index)
            positions.append(position)
        return Batch(torch.stack(images) if images else None, captions, indices, positions)

    def _bucketed(self, step: int) -> Batch:
        """This rank's slice of the bucket plan's global batch `step`, all of one size."""
        size, members = self.plan(step)
        mine = members[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        positions = list(self.positions(step))
        images, captions, indices = [], [], []
        for position, index in zip(positions, mine):
            example, tries = self.source[index], 0
            while example is None:  # a readable header over unreadable data: take another of the bucket
                tries += 1
                if tries > 100:
                    raise DataError(f"{self.source.describe()}: 100 unreadable images in a row")
                index = self.plan.neighbour(size, index, tries)
                example = self.source[index]
            rng = sample_rng(self.seed, position, "sample")
            images.append(to_tensor(fit_to_bucket(example.image, size, self.config.random_crop,
                                                  self.config.flip, rng)))
            captions.append("" if rng.random() < self.config.caption_dropout else example.caption)
            indices.append(index)
        return Batch(torch.stack(images), captions, indices, positions)

    def source_caption(self, index: int, position: int = 0) -> str:
        """The caption of image `index` where the stream meets it at `position` (shapes phrase it anew)."""
        if isinstance(self.source, ShapesSource):
            return self.source.caption(index, sample_rng(self.seed, position, "caption"))
        return self.source.captions[index]
