"""How well the classical segmenter finds the lines of real pages, against their XML.

    python bench/segmentation.py [PAGES_DIR]     (default ../shared/data/pages)

A found box matches a ground-truth line when their boxes overlap with IoU >= 0.5
(each used once). Prints one row per page and a total.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hwr.images import open_rgb
from hwr.pages.segment import Box, ProjectionSegmenter, count_matches, page_boxes
from hwr.pages.xml_import import read_page


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/pages")
    segmenter = ProjectionSegmenter()
    rows, totals = [], [0, 0, 0]
    start = time.perf_counter()
    for xml in sorted(root.glob("**/*.xml")):
        page = read_page(xml)
        truth = [Box.around(ln.polygon) for ln in page.lines if len(ln.polygon) >= 3]
        image = open_rgb(page.image)
        found = [page_boxes(b, image.size) for b in segmenter.segment(image)]
        n = count_matches(found, truth)
        rows.append((xml.parent.name + "/" + xml.stem, len(truth), len(found), n))
        for k, v in enumerate((len(truth), len(found), n)):
            totals[k] += v
    elapsed = time.perf_counter() - start
    print("| page | XML lines | found | matched (IoU>=0.5) | recall | precision |")
    print("|---|---|---|---|---|---|")
    for name, t, f, n in [*rows, ("total", *totals)]:
        print(f"| {name} | {t} | {f} | {n} | {n / max(t, 1):.2f} | {n / max(f, 1):.2f} |")
    print(f"\n{len(rows)} pages in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
