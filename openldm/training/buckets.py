"""Aspect-ratio bucketing (NovelAI 2022, as kohya trains): batches of one size, near each image's shape.

Images are not cropped to squares: each joins the bucket (a width x height of about the training
area) whose aspect ratio is nearest its own, and every batch draws from a single bucket. Like the
square batch order in `data.py`, the plan is a pure function of (seed, epoch), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from PIL import Image

Size = tuple[int, int]  # (width, height)
MAX_RATIO = 2.0  # the most elongated bucket: 2:1 either way


def bucket_sizes(side: int, step: int) -> list[Size]:
    """Sizes of about side x side pixels, both sides multiples of `step`, aspect at most MAX_RATIO."""
    area, sizes = side * side, []
    for width in range(step, int(side * MAX_RATIO) + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= MAX_RATIO:
            sizes.append((width, height))
    return sizes


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose log aspect ratio is closest to the image's."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


class BucketPlan:
    """Step -> (bucket size, the dataset indices of one global batch), never mixing buckets.

    Each epoch shuffles every bucket, cuts it into whole global batches (a bucket's remainder
    waits for another epoch's shuffle) and shuffles the batches, all seeded by (seed, epoch).
    """

    def __init__(self, sizes: Sequence[Size | None], buckets: Sequence[Size], seed: int, global_batch: int):
        self.members: dict[Size, list[int]] = {}
        for index, size in enumerate(sizes):
            if size is not None:  # unreadable: already counted and reported by the source
                self.members.setdefault(nearest_bucket(size, buckets), []).append(index)
        self.seed, self.global_batch = seed, global_batch
        self.per_epoch = sum(len(m) // global_batch for m in self.members.values())
        self._epoch, self._batches = -1, []

    def __call__(self, step: int) -> tuple[Size, list[int]]:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[offset]

    def _plan(self, epoch: int) -> list[tuple[Size, list[int]]]:
        rng, g = random.Random(f"{self.seed}:buckets:{epoch}"), self.global_batch
        batches = []
        for size in sorted(self.members):
            members = self.members[size][:]
            rng.shuffle(members)
            batches += [(size, members[i:i + g]) for i in range(0, len(members) - g + 1, g)]
        rng.shuffle(batches)
        return batches

    def neighbour(self, size: Size, index: int, distance: int) -> int:
        """Another image of the same bucket, to stand in for one that fails to decode."""
        members = self.members[size]
        return members[(members.index(index) + distance) % len(members)]


def fit_to_bucket(image: Image.Image, size: Size, random_crop: bool, flip: bool,
                  rng: random.Random) -> Image.Image:
    """Resize to cover the bucket, crop to it (centred, or at random), maybe flip."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    cover = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(cover, Image.Resampling.BICUBIC)
    if random_crop:
        left, top = rng.randint(0, cover[0] - width), rng.randint(0, cover[1] - height)
    else:
        left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    image = image.crop((left, top, left + width, top + height))
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image
