"""Images made in code, for calibration when the user gives none and for verification: varied on purpose
(gradients, stripes, checkerboards, discs, noise, flat colours) so int8 ranges and the cosine checks see more than
one kind of input. Real photographs calibrate better: ``--calibration-images DIR`` takes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def synthetic_images(count: int, *, size: tuple[int, int] = (160, 120), seed: int = 0) -> list[Any]:
    """``count`` different RGB uint8 arrays, deterministic for a seed, of a non-square ``size`` (width, height)
    so padding to square is exercised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    images = []
    for index in range(count):
        kind = index % 6
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if kind == 0:
            phase = rng.uniform(0, 1)
            image = np.stack([x / width * 255, y / height * 255, ((x + y) / (width + height) + phase) % 1 * 255], -1)
        elif kind == 1:
            period = int(rng.integers(4, 24))
            image = (np.sin(x * 2 * np.pi / period) > 0)[..., None] * colour
        elif kind == 2:
            cell = int(rng.integers(6, 30))
            board = ((x // cell + y // cell) % 2)[..., None]
            image = board * colour + (1 - board) * (255 - colour)
        elif kind == 3:
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 60)
            image = ((x - cx) ** 2 + (y - cy) ** 2 < r * r)[..., None] * colour + 30
        elif kind == 4:
            image = rng.integers(0, 256, size=(height, width, 3)).astype(np.float32)
        else:
            image = np.broadcast_to(colour, (height, width, 3)) + rng.normal(0, 8, size=(height, width, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
