"""Pages without ground truth -> line images, in reading order.

A classical segmenter that needs no model: normalise the background, binarise, deskew,
split columns at a wide vertical gap, then cut each column into lines with the
horizontal projection profile. Any object with `segment(image) -> list[Box]` can take
its place, as the learned line finder does (hwr.pages.finder).

    python -m hwr segment PAGE_IMAGE... --out OUT_DIR --classical
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from tqdm.auto import tqdm

from hwr.images import open_rgb
from hwr.pages.xml_import import crop_line, paper_colour
from hwr.report import write_text


@dataclass(frozen=True)
class Box:
    """A line's box in page pixels, the skew it was found at (degrees), and the line's
    outline inside the box where the segmenter traced one (page pixels; cut along it)."""

    left: int
    top: int
    right: int
    bottom: int
    angle: float = 0.0
    polygon: tuple[tuple[float, float], ...] = ()

    @classmethod
    def around(cls, polygon: Sequence[tuple[float, float]]) -> Box:
        """The upright box around a polygon."""
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        return cls(int(min(xs)), int(min(ys)), int(max(xs)), int(max(ys)))

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)

    def iou(self, other: Box) -> float:
        inter = Box(
            max(self.left, other.left),
            max(self.top, other.top),
            min(self.right, other.right),
            min(self.bottom, other.bottom),
        ).area
        union = self.area + other.area - inter
        return inter / union if union else 0.0


def count_matches(found: Sequence[Box], truth: Sequence[Box], threshold: float = 0.5) -> int:
    """How many found boxes match a true line (IoU >= threshold), each used at most once."""
    pairs = sorted(
        ((f.iou(t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True
    )
    used_found, used_truth = set(), set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in used_found and j not in used_truth:
            used_found.add(i)
            used_truth.add(j)
    return len(used_found)


class Segmenter(Protocol):
    def segment(self, image: Image.Image) -> list[Box]: ...


def _smooth(profile: np.ndarray, width: int) -> np.ndarray:
    width = max(1, width)
    return np.convolve(profile, np.ones(width) / width, mode="same")


def _window_sum(a: np.ndarray, length: int) -> np.ndarray:
    """Sum of each row over windows of `length` columns (result is `length - 1` shorter)."""
    c = np.cumsum(np.pad(a, ((0, 0), (1, 0))), axis=1)
    return c[:, length:] - c[:, :-length]


def _remove_rules(ink: np.ndarray, length: int) -> np.ndarray:
    """Drop long straight horizontal runs (printed ruling, underlines of a form)."""
    full = (_window_sum(ink, length) >= length).astype(np.float32)  # windows all ink
    covered = _window_sum(np.pad(full, ((0, 0), (length - 1, length - 1))), length) > 0
    covered = covered | np.roll(covered, 1, axis=0) | np.roll(covered, -1, axis=0)
    return np.where(covered, 0.0, ink).astype(np.float32)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


@dataclass
class ProjectionSegmenter:
    """Projection-profile line segmentation with deskew and two-column detection.

    work_width: pages are analysed at this width (speed); boxes come back in page pixels.
    max_skew: degrees searched either way for the deskew.
    """

    work_width: int = 1200
    max_skew: float = 3.0
    min_line_height: int = 8

    def ink(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """Ink map in [0, 1] at work size: darkness against the local background."""
        gray = ImageOps.grayscale(image)
        scale = self.work_width / gray.width
        gray = gray.resize((self.work_width, max(1, round(gray.height * scale))), Image.BILINEAR)
        background = gray.filter(ImageFilter.MaxFilter(9)).filter(ImageFilter.GaussianBlur(12))
        dark = np.asarray(background, np.float32) - np.asarray(gray, np.float32)
        dark = np.clip(dark, 0, None)
        threshold = max(8.0, float(np.percentile(dark, 99)) * 0.35)
        ink = (dark > threshold).astype(np.float32)
        edge = self.work_width // 60  # scanner edges and page borders are not text
        ink[:edge], ink[-edge:], ink[:, :edge], ink[:, -edge:] = 0, 0, 0, 0
        return _remove_rules(ink, self.work_width // 12), scale

    def deskew(self, ink: np.ndarray) -> float:
        """The angle whose horizontal profile is sharpest (lines stand out most)."""
        image = Image.fromarray((ink * 255).astype(np.uint8))
        best, best_score = 0.0, -1.0
        for angle in np.arange(-self.max_skew, self.max_skew + 1e-6, 0.25):
            rotated = np.asarray(image.rotate(float(angle), Image.NEAREST), np.float32)
            score = float(np.square(np.diff(rotated.sum(axis=1))).sum())
            if score > best_score:
                best, best_score = float(angle), score
        return best

    def columns(self, ink: np.ndarray) -> list[tuple[int, int]]:
        """One column, or two when a wide empty gap runs down the middle of the text."""
        profile = _smooth(ink.sum(axis=0), 15)
        text = np.flatnonzero(profile > 0.02 * profile.max())
        if len(text) == 0:
            return []
        left, right = int(text[0]), int(text[-1]) + 1
        empty = profile < 0.05 * profile[left:right].mean()
        for start, end in _runs(empty[left:right]):
            start, end = start + left, end + left
            middle = left + 0.3 * (right - left) < (start + end) / 2 < left + 0.7 * (right - left)
            if middle and end - start > 0.04 * ink.shape[1]:
                return [(left, start), (end, right)]
        return [(left, right)]

    def lines(self, ink: np.ndarray, left: int, right: int) -> list[tuple[int, int, int, int]]:
        """Cut one column into lines at the valleys of its horizontal profile."""
        column = ink[:, left:right]
        raw = column.sum(axis=1)
        if raw.max() == 0:
            return []
        # Line pitch: the first clear peak of the profile's autocorrelation.
        centred = raw - raw.mean()
        auto = np.correlate(centred, centred, mode="full")[len(raw) - 1 :]
        auto = auto / auto[0] if auto[0] > 0 else auto
        pitch = next(
            (
                i
                for i in range(self.min_line_height, len(auto) - 1)
                if auto[i] > 0.1 and auto[i] >= auto[i - 1] and auto[i] > auto[i + 1]
            ),
            30,
        )
        profile = _smooth(raw, max(3, pitch // 3))
        peaks = [
            i
            for i in range(1, len(profile) - 1)
            if profile[i] >= profile[i - 1]
            and profile[i] > profile[i + 1]
            and profile[i] > 0.2 * profile.max()
        ]
        kept: list[int] = []
        for p in peaks:  # merge peaks closer than half a line
            if kept and p - kept[-1] < 0.5 * pitch:
                if profile[p] > profile[kept[-1]]:
                    kept[-1] = p
            else:
                kept.append(p)
        boxes = []
        for k, p in enumerate(kept):
            top = (
                kept[k - 1] + int(np.argmin(profile[kept[k - 1] : p]))
                if k
                else max(0, p - pitch // 2 - pitch // 4)
            )
            bottom = (
                p + int(np.argmin(profile[p : kept[k + 1]]))
                if k + 1 < len(kept)
                else min(len(profile), p + pitch // 2 + pitch // 4)
            )
            rows = np.flatnonzero(raw[top:bottom] > 0.08 * raw[top:bottom].max())
            if len(rows) == 0:
                continue
            top, bottom = top + int(rows[0]), top + int(rows[-1]) + 1  # hug the ink
            band = column[top:bottom]
            xs = np.flatnonzero(_smooth(band.sum(axis=0), 9) > 0.5)
            if len(xs) == 0 or bottom - top < self.min_line_height or band.sum() < 3 * pitch:
                continue
            boxes.append((left + int(xs[0]), top, left + int(xs[-1]) + 1, bottom))
        return boxes

    def segment(self, image: Image.Image) -> list[Box]:
        ink, scale = self.ink(image)
        angle = self.deskew(ink)
        straight = (
            np.asarray(
                Image.fromarray((ink * 255).astype(np.uint8)).rotate(angle, Image.NEAREST),
                np.float32,
            )
            / 255
        )
        found = [b for lo, hi in self.columns(straight) for b in self.lines(straight, lo, hi)]
        pad = 4
        return [
            Box(
                max(0, round((x0 - pad) / scale)),
                max(0, round((y0 - pad) / scale)),
                min(image.width, round((x1 + pad) / scale)),
                min(image.height, round((y1 + pad) / scale)),
                angle,
            )
            for x0, y0, x1, y1 in found
        ]


def crop_lines(image: Image.Image, boxes: Sequence[Box]) -> list[Image.Image]:
    """The lines, cut from the page turned by their skew (about the page centre); a line
    with an outline is cut along it, the rest of its box (its neighbours' ascenders and
    descenders) painted paper, as `import-xml` cuts lines from their XML.

    A segmenter finds one skew per page, so the page is turned once for all its lines.
    """
    turned: dict[float, Image.Image] = {0.0: image}
    fill = (255,) * len(image.getbands())
    for angle in {b.angle for b in boxes} - {0.0}:
        turned[angle] = image.rotate(angle, Image.BICUBIC, fillcolor=fill)
    paper = paper_colour(image) if any(b.polygon for b in boxes) else fill
    return [
        crop_line(turned[b.angle], b.polygon, paper)
        if b.polygon
        else turned[b.angle].crop((b.left, b.top, b.right, b.bottom))
        for b in boxes
    ]


def page_boxes(box: Box, size: tuple[int, int]) -> Box:
    """A box found on the deskewed page, as an upright box on the original page."""
    if not box.angle:
        return box
    cx, cy = size[0] / 2, size[1] / 2
    a = math.radians(box.angle)  # PIL turns counter-clockwise; undo it
    corners = [
        (box.left, box.top),
        (box.right, box.top),
        (box.left, box.bottom),
        (box.right, box.bottom),
    ]
    xs, ys = [], []
    for x, y in corners:
        dx, dy = x - cx, y - cy
        xs.append(cx + dx * math.cos(a) + dy * math.sin(a))
        ys.append(cy - dx * math.sin(a) + dy * math.cos(a))
    return Box(round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys)))


def box_text(box: Box) -> str:
    """A box as the CSV's `box` column holds it: "left top right bottom" in page pixels."""
    return f"{box.left} {box.top} {box.right} {box.bottom}"


def segment_pages(pages: Sequence[Path], out_dir: Path, segmenter: Segmenter) -> Path:
    """Write out_dir/images/<page>_<n>.png and out_dir/lines.csv with empty text to fill in;
    each row names its page image and its box there, so that the labelling page can show
    the page and cut a line the segmenter missed."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text", "page", "page_image", "box"])
    total = 0
    for page in tqdm(pages, desc="segmenting", unit="page"):
        image = open_rgb(page)
        where = os.path.relpath(Path(page).resolve(), out_dir.resolve())
        boxes = segmenter.segment(image)
        for i, (box, line) in enumerate(zip(boxes, crop_lines(image, boxes), strict=True)):
            name = f"images/{Path(page).stem}_{i:03d}.png"
            line.save(out_dir / name)
            upright = box_text(page_boxes(box, image.size))
            writer.writerow([name, "", Path(page).stem, where, upright])
            total += 1
    csv_path = write_text(out_dir / "lines.csv", buf.getvalue())
    print(f"{total} lines from {len(pages)} pages -> {csv_path}")
    return csv_path
