"""Reading any image file as what the models see: 8-bit RGB, upright, on white paper.

One function for training, evaluation, predict, the labelling page and the page tools,
because Pillow's own `convert("RGB")` turns a 16-bit scan all white and a transparent
background all black, and both would be trained on without a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# A line image smaller than this on either side holds no readable writing.
MIN_SIDE = 8
# Real line crops reach about 3 times taller than wide (one tall letter); past this it is
# a rotated line or not a line at all.
MAX_TALL = 5.0
# predict's rule: an image taller than half its width and at least this high is a page.
PAGE_MIN_HEIGHT = 200


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, turned as its EXIF orientation says, transparency composited on white.

    16- and 32-bit grayscale are scaled by the range their values fill (8, 16 or 31 bits;
    floats 0-1 or 0-255); palette, CMYK, 1-bit and LA convert as Pillow does.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        peak = float(pixels.max(initial=0.0))
        ranges = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        top = next((t for t in ranges if peak <= t), 2.0**31 - 1)
        image = Image.fromarray(np.clip(pixels * (255.0 / top), 0, 255).round().astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode the whole file (a truncated one fails here, not later) and `to_rgb` it."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def too_small(image: Image.Image) -> str | None:
    """Why an image is too small to hold writing, or None."""
    if min(image.size) < MIN_SIDE:
        return (
            f"too small to hold writing ({image.width}x{image.height} px; {MIN_SIDE} px at least)"
        )
    return None


def line_problem(image: Image.Image) -> str | None:
    """Why an RGB image cannot be a line of writing to train on, or None."""
    if reason := too_small(image):
        return reason
    if image.height > MAX_TALL * image.width:
        return (
            f"not a line: {image.width}x{image.height} px, over {MAX_TALL:g} times taller than "
            "wide (rotated?)"
        )
    if all(lo == hi for lo, hi in image.getextrema()):
        return "blank: every pixel is the same colour"
    return None


def is_page(image: Image.Image) -> bool:
    """Line images are wide and short: a page is taller than half its width and
    PAGE_MIN_HEIGHT px high at least (a one-word line crop can be nearly square)."""
    return image.height > 0.5 * image.width and image.height >= PAGE_MIN_HEIGHT


def batching_order(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Line images' indices by width-to-height, the order every reader batches them in
    (validation, evaluate.py, predict): lines of a shape hold about as many characters, so
    a batch finishes decoding at about the same step instead of waiting for its longest."""
    return sorted(range(len(sizes)), key=lambda i: sizes[i][0] / sizes[i][1])
