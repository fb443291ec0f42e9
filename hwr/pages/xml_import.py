"""Ground truth people already have: ALTO XML (eScriptorium, kraken) and PAGE XML
(Transkribus) with their page images -> the project's line CSV and line images.

    python -m hwr import-xml PAGES_DIR --out OUT_DIR
"""

from __future__ import annotations

import csv
import io
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.report import write_skipped, write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")
Point = tuple[float, float]


@dataclass(frozen=True)
class PageLine:
    polygon: list[Point]  # in image pixels
    text: str


@dataclass(frozen=True)
class Page:
    xml: Path
    image: Path
    lines: list[PageLine]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _descendants(elem: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in elem.iter() if _local(e.tag) == name]


def _points(text: str) -> list[Point]:
    """ALTO writes "x y x y ...", PAGE "x,y x,y ..."; accept both."""
    values = [float(v) for v in text.replace(",", " ").split()]
    return list(zip(values[::2], values[1::2], strict=False))


def _find_image(xml: Path, name: str | None) -> Path:
    """The image the XML names, else one with the XML's name: beside it, or one folder up
    (exports that file their XML in alto/ or page/ beside the images)."""
    candidates = []
    for folder in (xml.parent, xml.parent.parent):
        candidates += [folder / name] if name else []
        candidates += [folder / f"{xml.stem}{s}" for s in IMAGE_SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    named = f"{name} (named in the XML) or " if name else ""
    raise FileNotFoundError(
        f"{xml}: page image not found: no {named}{xml.stem}"
        f"{{{','.join(IMAGE_SUFFIXES)}}} in {xml.parent} or {xml.parent.parent}"
    )


def read_page(xml: Path) -> Page:
    """Parse one ALTO or PAGE XML file; polygons are scaled to the real image size."""
    xml = Path(xml)
    root = ET.parse(xml).getroot()
    kind = _local(root.tag)
    if kind == "alto":
        names = [e.text for e in _descendants(root, "fileName") if e.text]
        page = _descendants(root, "Page")[0]
        declared = (float(page.get("WIDTH", 0)), float(page.get("HEIGHT", 0)))
        lines = []
        for line in _descendants(root, "TextLine"):
            polygons = _descendants(line, "Polygon")
            if polygons:
                polygon = _points(polygons[0].get("POINTS", ""))
            else:
                x, y = float(line.get("HPOS", 0)), float(line.get("VPOS", 0))
                w, h = float(line.get("WIDTH", 0)), float(line.get("HEIGHT", 0))
                polygon = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
            words = [s.get("CONTENT", "") for s in _children(line, "String")]
            lines.append(PageLine(polygon, " ".join(w for w in words if w).strip()))
    elif kind == "PcGts":
        page = _descendants(root, "Page")[0]
        names = [page.get("imageFilename")]
        declared = (float(page.get("imageWidth", 0)), float(page.get("imageHeight", 0)))
        lines = []
        for line in _descendants(root, "TextLine"):
            coords = _children(line, "Coords")
            polygon = _points(coords[0].get("points", "")) if coords else []
            equivs = _children(line, "TextEquiv")
            unicode = _children(equivs[0], "Unicode") if equivs else []
            text = (unicode[0].text or "") if unicode else ""
            lines.append(PageLine(polygon, text.strip()))
    else:
        raise ValueError(f"{xml}: neither ALTO nor PAGE XML (root element <{kind}>)")

    image = _find_image(xml, names[0] if names else None)
    with Image.open(image) as img:
        size = img.size
    sx = size[0] / declared[0] if declared[0] else 1.0
    sy = size[1] / declared[1] if declared[1] else 1.0
    if (sx, sy) != (1.0, 1.0):
        lines = [PageLine([(x * sx, y * sy) for x, y in ln.polygon], ln.text) for ln in lines]
    return Page(xml, image, lines)


def paper_colour(image: Image.Image) -> tuple[int, ...]:
    """The page's background: the median of its brighter half, per channel."""
    small = np.asarray(image.convert("RGB").resize((200, 200)), dtype=np.float32)
    gray = small.mean(axis=2)
    return tuple(int(v) for v in np.median(small[gray >= np.median(gray)], axis=0))


def crop_line(
    image: Image.Image, polygon: Sequence[Point], paper: tuple[int, ...], margin: int = 6
) -> Image.Image:
    """The polygon's bounding box, with everything outside the polygon (+ margin) painted paper."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    box = (
        max(0, int(min(xs)) - margin),
        max(0, int(min(ys)) - margin),
        min(image.width, int(max(xs)) + margin + 1),
        min(image.height, int(max(ys)) + margin + 1),
    )
    crop = image.crop(box)
    mask = Image.new("L", crop.size, 0)
    shifted = [(x - box[0], y - box[1]) for x, y in polygon]
    draw = ImageDraw.Draw(mask)
    draw.polygon(shifted, fill=255)
    draw.line([*shifted, shifted[0]], fill=255, width=2 * margin, joint="curve")  # grow it
    background = Image.new(crop.mode, crop.size, paper if crop.mode == "RGB" else paper[0])
    return Image.composite(crop, background, mask)


def import_pages(xmls: Sequence[Path], out_dir: Path, max_height: int | None = None) -> Path:
    """Write out_dir/images/<page>_<n>.png and out_dir/lines.csv (file_name, text, page, folder).

    Pages keep their place under the XMLs' common folder: a page is named by its path
    there, and `folder` (its folder there, or the common folder's name) tells documents or
    hands apart in corpora filed one per folder, to split by. Lines taller than max_height
    are scaled down to it. A page that cannot be read (its image missing or broken, XML that
    is not ALTO or PAGE) is listed in out_dir/skipped.csv with the reason, and the others
    are imported.
    """
    out_dir = Path(out_dir)
    xmls = [Path(x) for x in xmls]
    root = Path(os.path.commonpath([x.parent for x in xmls]))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    skipped: Counter[str] = Counter()
    bad_pages: dict[str, str] = {}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text", "page", "folder"])
    n_lines = 0
    for xml in tqdm(sorted(xmls), desc="importing pages", unit="page"):
        try:
            page = read_page(xml)
            image = open_rgb(page.image)
        except (OSError, ValueError, ET.ParseError, IndexError) as e:
            # OSError covers a missing image and Pillow's unreadable ones.
            bad_pages[str(xml)] = f"{type(e).__name__}: {str(e).removeprefix(f'{xml}: ')}"
            continue
        name = xml.relative_to(root).with_suffix("").as_posix()
        folder = xml.parent.relative_to(root).as_posix()
        folder = root.resolve().name if folder == "." else folder
        (out_dir / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        paper = paper_colour(image)
        for i, line in enumerate(page.lines):
            if not line.text:
                skipped["empty text"] += 1
                continue
            if len(line.polygon) < 3:
                skipped["no polygon"] += 1
                continue
            crop = crop_line(image, line.polygon, paper)
            if max_height and crop.height > max_height:
                width = max(1, round(crop.width * max_height / crop.height))
                crop = crop.resize((width, max_height), Image.Resampling.LANCZOS)
            file_name = f"images/{name}_{i:03d}.png"
            crop.save(out_dir / file_name)
            writer.writerow([file_name, line.text, name, folder])
            n_lines += 1
    if bad_pages:
        listing = write_skipped(out_dir, bad_pages)
        print(
            f"{len(bad_pages)} page(s) could not be read (listed in {out_dir / 'skipped.csv'}):\n"
            + listing
        )
    if not n_lines:
        raise UserError(f"No line with text in the {len(xmls)} XML file(s): nothing imported.")
    csv_path = write_text(out_dir / "lines.csv", buf.getvalue())
    extra = "; ".join(f"{n} x {why}" for why, n in skipped.items())
    print(
        f"{n_lines} lines from {len(xmls) - len(bad_pages)} pages -> {csv_path}"
        + (f"; skipped {extra}" if extra else "")
    )
    return csv_path
