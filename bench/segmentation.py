"""Each line finder on real pages, against their XML: the lines it finds and, with --read,
the page's text as `predict.py` reads it.

    python bench/segmentation.py [PAGES_DIR] [--finder FOLDER] [--read MODEL] [--kraken]

PAGES_DIR: ../shared/data/pages by default (pages no line finder was trained on). The
classical segmenter and the learned one (--finder, else the shipped weights) are measured.
A found box matches a true line when their boxes overlap with IoU >= 0.5 (each used once).
--read (a model, e.g. `embedded`) cuts each page into lines as predict.py does, reads
them, joins them in the finder's reading order and scores that text against the XML's
lines in theirs (page CER: a missed line, a line cut in two or read out of order all cost
characters).
--kraken adds kraken's learned line finder (`blla`, its shipped default model) beside
them. kraken 7.1.1 pins torch <= 2.14.0, so install it apart: a venv that sees this one's
packages (`python -m venv --system-site-packages kvenv`, `kvenv/bin/pip install --no-deps
kraken==7.1.1` and its other requirements) and run this script with its python.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from torchmetrics.functional.text import char_error_rate

from hwr.decoding import read_images
from hwr.images import open_rgb
from hwr.model import load_pretrained
from hwr.pages.finder import LearnedSegmenter
from hwr.pages.segment import Box, ProjectionSegmenter, count_matches, crop_lines, page_boxes
from hwr.pages.xml_import import read_page


class KrakenSegmenter:
    """kraken's blla behind hwr's `segment(image) -> boxes`: each line's box around its
    boundary polygon, cut along that polygon as ours are, in kraken's reading order."""

    def __init__(self) -> None:
        from importlib import resources

        from kraken import blla
        from kraken.lib import vgsl

        self.blla = blla
        self.model = vgsl.TorchVGSLModel.load_model(resources.files("kraken") / "blla.mlmodel")

    def segment(self, image) -> list[Box]:
        lines = self.blla.segment(image, model=self.model).lines
        return [
            replace(Box.around(line.boundary), polygon=tuple(map(tuple, line.boundary)))
            for line in lines
            if line.boundary
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="?", default="../shared/data/pages", type=Path)
    parser.add_argument("--finder", help="a learned line finder's folder (default: shipped)")
    parser.add_argument("--read", metavar="MODEL", help="read each page's lines with MODEL")
    parser.add_argument("--kraken", action="store_true", help="kraken's blla beside them")
    args = parser.parse_args()

    segmenters = {"classical": ProjectionSegmenter(), "learned": LearnedSegmenter(args.finder)}
    if args.kraken:
        segmenters["kraken blla"] = KrakenSegmenter()
    model = load_pretrained(args.read) if args.read else None
    if model:
        model[0].eval()
    pages = [read_page(xml) for xml in sorted(args.pages.glob("**/*.xml"))]
    rows: dict[str, list[tuple[int, int, int]]] = {name: [] for name in segmenters}
    totals = {}
    for name, segmenter in segmenters.items():
        seconds, read, truth_text = 0.0, [], []
        for page in pages:
            image = open_rgb(page.image)
            lines = [ln for ln in page.lines if len(ln.polygon) >= 3]
            truth = [Box.around(ln.polygon) for ln in lines]
            start = time.perf_counter()
            boxes = segmenter.segment(image)
            seconds += time.perf_counter() - start
            found = [page_boxes(b, image.size) for b in boxes]
            rows[name].append((len(truth), len(found), count_matches(found, truth)))
            if model:
                texts = read_images(*model, crop_lines(image, boxes), batch_size=16)[0]
                read.append("\n".join(texts))
                truth_text.append("\n".join(ln.text for ln in lines))
        t, f, m = (sum(r[k] for r in rows[name]) for k in range(3))
        cer = float(char_error_rate(read, truth_text)) if model else None
        totals[name] = (t, f, m, seconds / max(len(pages), 1), cer)

    names = list(segmenters)
    print("| page | XML lines | " + " | ".join(f"{n}: found, matched" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, page in enumerate(pages):
        cells = " | ".join(f"{rows[n][i][1]}, {rows[n][i][2]}" for n in names)
        print(f"| {page.xml.parent.name}/{page.xml.stem} | {rows[names[0]][i][0]} | {cells} |")
    print(f"\n{len(pages)} pages")
    extra = (" page CER |", "---|") if model else ("", "")
    print(f"| line finder | recall | precision | seconds a page |{extra[0]}")
    print(f"|---|---|---|---|{extra[1]}")
    for name, (t, f, m, per_page, cer) in totals.items():
        page_cer = f" {cer:.3f} |" if cer is not None else ""
        print(f"| {name} | {m / max(t, 1):.3f} | {m / max(f, 1):.3f} | {per_page:.2f} |{page_cer}")


if __name__ == "__main__":
    main()
