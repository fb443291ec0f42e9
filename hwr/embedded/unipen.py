"""UNIPEN's pen trajectories (train_r01_v07) drawn as scanned line images: real English
handwriting of about 2,000 writers, as a pre-training corpus (conf/corpus/unipen.yaml).

Its text segments are lines as written; its words (cursive and mixed) are set side by side,
a writer's words in the order written, into lines of one to six. Each line is drawn once
with its own pen width, slant, paper and scan noise (hwr.embedded.synth.scan); pre-training
augments it further.

    python -m hwr import-unipen train_r01_v07 --out ../corpora/unipen
"""

from __future__ import annotations

import contextlib
import csv
import io
import multiprocessing
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from hwr.embedded.synth import scan
from hwr.errors import UserError
from hwr.report import write_text

Stroke = np.ndarray  # points (x, y), y up
# ".SEGMENT TEXT 0-19 GOOD "label"": kind, components, quality, label.
SEGMENT = re.compile(r'(\w+)\s+([\d:,\- ]+?)\s+(\S+)\s+"(.*)"\s*$')
# The categories of written text (UNIPEN's 6: cursive words, 7: mixed words, 8: text).
CATEGORIES = ("6", "7", "8")


@dataclass
class Sample:
    """One segment's pen-down strokes (y up, tablet units) and its transcription."""

    strokes: list[Stroke]
    text: str
    writer: str


def _read(path: Path, root: Path, state: dict) -> None:
    """Follow a UNIPEN file and its .INCLUDEs (not lexicons), collecting components and
    segments; a file is cut at its directives, so each component's points parse at once."""
    for block in re.split(r"^\.", path.read_text(encoding="latin-1"), flags=re.M)[1:]:
        key, _, rest = block.partition("\n") if block[:1].isupper() else ("", "", "")
        key, _, arg = key.strip().partition(" ") if " " in key else key.strip().partition("\t")
        arg = arg.strip()
        if key == "INCLUDE" and not arg.endswith(".lex"):
            _read(root / "include" / arg, root, state)
        elif key in ("PEN_DOWN", "PEN_UP"):
            values = rest.split()
            columns = state["columns"]
            with contextlib.suppress(ValueError):
                xy = np.array(values[: len(values) // columns * columns], dtype=float)
                points = xy.reshape(-1, columns)[:, :2]
                state["components"].append((key == "PEN_DOWN", points))
        elif key == "COORD":
            state["columns"] = len(arg.split()) or 2
        elif key == "SEGMENT":
            state["segments"].append(arg)
        elif key == "WRITER_ID":
            state["writer"] = arg


def _component_ids(spec: str) -> Iterator[int]:
    """'0-3,7' or '2:5-4:10' (point ranges taken whole) -> 0, 1, 2, 3, 7."""
    for part in spec.replace(" ", "").split(","):
        first, _, last = part.partition("-")
        a = int(first.split(":")[0])
        yield from range(a, int(last.split(":")[0]) + 1 if last else a + 1)


def detokenize(label: str) -> str:
    """UNIPEN's tokenised text as written: 'year , I failed .' -> 'year, I failed.'; its
    escapes undone (one lab marks letters with '\\@': 'sha\\@l\\@l' -> 'shall')."""
    text = re.sub(r"\\(.)", r"\1", label.replace("\\@", ""))
    text = re.sub(r"\s+([,.;:!?)\]}%])", r"\1", text)
    text = re.sub(r"([(\[{$])\s+", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return " ".join(text.split())


def read_file(path: Path, root: Path) -> list[Sample]:
    """A data file's TEXT and WORD segments. Components are the .PEN_DOWN/.PEN_UP blocks
    that hold points (some sources mark pen lifts with empty blocks that are not counted)."""
    state: dict = {"components": [], "segments": [], "writer": None, "columns": 2}
    _read(path, root, state)
    components = [c for c in state["components"] if len(c[1])]
    writer = f"{path.relative_to(root / 'data').parts[1]}/{state['writer'] or path.stem}"
    samples = []
    for segment in state["segments"]:
        m = SEGMENT.match(segment)
        if not m or m[1] not in ("TEXT", "WORD") or m[3] == "BAD":
            continue
        try:
            ids = list(_component_ids(m[2]))
        except ValueError:
            continue
        strokes = [components[i][1] for i in ids if i < len(components) and components[i][0]]
        text = detokenize(m[4])
        if strokes and text:
            samples.append(Sample(strokes, text, writer))
    return samples


def _bounds(strokes: list[Stroke]) -> tuple[float, float, float, float]:
    xy = np.concatenate(strokes)
    return xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()


def one_line(sample: Sample) -> bool:
    """Whether the ink looks like one line: a segment written over two or more lines is
    too tall for its length (one line is about 0.25 x its characters as wide as high; two
    lines half that)."""
    x0, y0, x1, y1 = _bounds(sample.strokes)
    aspect = (x1 - x0) / max(y1 - y0, 1e-6)
    return len(sample.text) < 12 or aspect >= 0.1 * len(sample.text)


def join_words(samples: list[Sample], rng: random.Random, max_chars: int = 60) -> list[Sample]:
    """A writer's words in the order written, set side by side into lines of 1-6 words
    (centred on each word's median height, 0.3-0.7 x the tallest word's height apart: a
    short word's own height would set it too close), as if written so."""
    lines, i = [], 0
    while i < len(samples):
        words = samples[i : i + rng.randint(1, 6)]
        while len(words) > 1 and len(" ".join(w.text for w in words)) > max_chars:
            words = words[:-1]
        i += len(words)
        bounds = [_bounds(w.strokes) for w in words]
        height = max(y1 - y0 for _, y0, _, y1 in bounds)
        strokes, x = [], 0.0
        for w, (x0, _, x1, _) in zip(words, bounds, strict=True):
            mid = float(np.median(np.concatenate(w.strokes)[:, 1]))
            strokes += [s - (x0 - x, mid) for s in w.strokes]
            x += x1 - x0 + height * rng.uniform(0.3, 0.7)
        lines.append(Sample(strokes, " ".join(w.text for w in words), words[0].writer))
    return lines


def draw(sample: Sample, rng: random.Random, height: int = 96) -> Image.Image:
    """The strokes as a scan: a pen of random width, drawn at 3x and scanned by
    hwr.embedded.synth.scan (slant, paper, pressure, blur, JPEG)."""
    x0, y0, x1, y1 = _bounds(sample.strokes)
    body = 3 * height * rng.uniform(0.6, 0.8)
    scale = body / max(y1 - y0, 1e-6)
    pen = max(1, round(3 * height * rng.uniform(0.02, 0.05)))
    size = (int((x1 - x0) * scale) + 2 * pen + 1, int(body) + 2 * pen + 1)
    if size[0] > 40 * size[1]:
        raise ValueError(f"{sample.writer}: ink {size} too wide for one line")
    mask = Image.new("L", size, 0)
    pen_draw = ImageDraw.Draw(mask)
    for stroke in sample.strokes:
        pts = [tuple(p) for p in ((stroke * (1, -1) - (x0, -y1)) * scale + pen).tolist()]
        if len(pts) > 1:
            pen_draw.line(pts, fill=255, width=pen, joint="curve")
        r = pen / 2
        for x, y in (pts[0], pts[-1]):
            pen_draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    mask = mask.resize((max(1, size[0] // 3), max(1, size[1] // 3)), Image.BILINEAR)
    return scan(mask, rng, height)


def _draw_file(job: tuple[Path, Path, Path, int, int]) -> tuple[list[list[str]], int]:
    """One data file's lines drawn and saved (a worker's job); its rows and how many were
    left out. Each file has its own seed: the same lines for any number of workers."""
    path, root, out_dir, seed, height = job
    category = path.relative_to(root / "data").parts[0]
    rng = random.Random(seed)
    try:
        samples = read_file(path, root)
    except (OSError, IndexError):
        return [], 0
    if category != "8":
        samples = join_words(samples, rng)
    rows, skipped = [], 0
    stem = "_".join(path.relative_to(root / "data").with_suffix("").parts)
    for i, sample in enumerate(samples):
        if len(sample.text) < 2 or not one_line(sample):
            skipped += 1
            continue
        try:
            image = draw(sample, rng, height)
        except ValueError:
            skipped += 1
            continue
        name = f"images/{stem}_{i:04d}.png"
        image.save(out_dir / name)
        rows.append([name, sample.text, sample.writer, category])
    return rows, skipped


def import_unipen(
    root: Path, out_dir: Path, seed: int = 0, height: int = 96, workers: int | None = None
) -> Path:
    """Every usable segment of UNIPEN's categories 6-8 under root, drawn as a line image:
    out_dir/images/*.png and out_dir/lines.csv (file_name, text, writer, category)."""
    root, out_dir = Path(root), Path(out_dir)
    files = sorted(f for c in CATEGORIES for f in (root / "data" / c).rglob("*.dat"))
    if not files:
        raise UserError(
            f"no UNIPEN data files under {root}/data/{{6,7,8}}: point at a clone of "
            "https://github.com/GreenCappuccino/train_r01_v07"
        )
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(f, root, out_dir, seed * 1_000_003 + i, height) for i, f in enumerate(files)]
    buf = io.StringIO()
    table = csv.writer(buf)
    table.writerow(["file_name", "text", "writer", "category"])
    kept = skipped = 0
    with multiprocessing.Pool(workers or os.cpu_count()) as pool:
        done = pool.imap(_draw_file, jobs, chunksize=8)
        for rows, left_out in tqdm(done, total=len(jobs), desc="UNIPEN files", unit="file"):
            table.writerows(rows)
            kept, skipped = kept + len(rows), skipped + left_out
    tqdm.write(f"{kept} lines drawn, {skipped} left out (one character, or not one line)")
    return write_text(out_dir / "lines.csv", buf.getvalue())
