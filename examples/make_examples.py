"""Draw the small synthetic example dataset in examples/dataset/: one concept (a spotted orange ball) on varied scenes.

Run `python examples/make_examples.py`; it overwrites only the files it writes. Deterministic: same files every run.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "dataset"

# (file stem, size, background colour, background words, ball centre as fractions, ball radius fraction)
SCENES = [
    ("ball-01", (96, 96), (70, 130, 200), "blue sky", (0.5, 0.5), 0.30),
    ("ball-02", (96, 96), (60, 160, 80), "green grass", (0.35, 0.6), 0.25),
    ("ball-03", (128, 96), (230, 220, 190), "sand", (0.7, 0.45), 0.28),
    ("ball-04", (128, 96), (40, 40, 60), "night", (0.3, 0.5), 0.32),
    ("ball-05", (96, 128), (200, 200, 210), "grey wall", (0.5, 0.35), 0.30),
    ("ball-06", (96, 96), (150, 90, 160), "purple cloth", (0.55, 0.55), 0.22),
    ("ball-07", (128, 96), (90, 170, 210), "water", (0.5, 0.55), 0.30),
]


def draw_scene(size: tuple[int, int], background: tuple[int, int, int], centre: tuple[float, float],
               radius: float, rng: random.Random) -> Image.Image:
    """One picture of the concept: an orange ball with three dark spots over a flat, lightly textured ground."""
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for _ in range(12):  # texture so that backgrounds are not perfectly flat
        x, y = rng.randrange(width), rng.randrange(height)
        shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in background)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=shade)
    cx, cy, r = centre[0] * width, centre[1] * height, radius * min(width, height)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(245, 140, 30), outline=(120, 60, 10), width=2)
    for dx, dy in ((-0.35, -0.3), (0.3, -0.1), (-0.05, 0.4)):
        sx, sy, sr = cx + dx * r, cy + dy * r, 0.18 * r
        draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(90, 40, 10))
    return image


def main() -> None:
    """Write every scene as a PNG with its .txt caption."""
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    for stem, size, background, words, centre, radius in SCENES:
        draw_scene(size, background, centre, radius, rng).save(OUT / f"{stem}.png", optimize=True)
        (OUT / f"{stem}.txt").write_text(f"spotted orange ball, {words}\n", encoding="utf-8")


if __name__ == "__main__":
    main()
