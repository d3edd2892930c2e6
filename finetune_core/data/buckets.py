"""Training resolutions: fixed size, aspect-ratio buckets around the training area, or each image's own size."""

from __future__ import annotations

import math

BUCKET_STEP = 64  # bucket sides are multiples of this (8 latent cells), as in other bucketing trainers
MAX_ASPECT = 4.0  # widest bucket ratio offered; images beyond it go to the widest bucket and are cropped

RESIZE_FIXED = "fixed"
RESIZE_BUCKETS = "buckets"
RESIZE_NONE = "none"
RESIZE_MODES = (RESIZE_FIXED, RESIZE_BUCKETS, RESIZE_NONE)

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(width: int, height: int, step: int = BUCKET_STEP, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """All (w, h) with sides multiples of `step`, area at most width*height, as large as possible per width."""
    area = width * height
    buckets: set[Size] = set()
    side = step
    while side * step <= area:
        other = (area // side) // step * step
        if other >= step and max(side, other) / min(side, other) <= max_aspect:
            buckets.add((side, other))
            buckets.add((other, side))
        side += step
    if not buckets:
        buckets.add((_round_to(width, step), _round_to(height, step)))
    # Keep only buckets no other bucket contains: (256, 832) is wasted next to (256, 1024).
    return sorted(b for b in buckets if not any(o != b and o[0] >= b[0] and o[1] >= b[1] for o in buckets))


def closest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log space); ties go to the larger area."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def own_size(size: Size, step: int = BUCKET_STEP) -> Size:
    """The image's own size rounded to multiples of `step` (the WebUI's "do not resize images", made encodable)."""
    return _round_to(size[0], step), _round_to(size[1], step)


def target_size(mode: str, size: Size, train_size: Size, buckets: list[Size] | None = None) -> Size:
    """The (width, height) an image of `size` trains at under `mode`."""
    if mode == RESIZE_BUCKETS:
        return closest_bucket(size, buckets if buckets is not None else make_buckets(*train_size))
    if mode == RESIZE_NONE:
        return own_size(size)
    return train_size


def _round_to(value: int, step: int) -> int:
    return max(step, round(value / step) * step)
