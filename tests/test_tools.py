"""From pages to lines and back: XML import, segmentation, predict, the labelling page."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hwr.embedded.synth import SAMPLE_TEXT, render_line
from hwr.pages.label import LabelStore, make_server
from hwr.pages.segment import (
    Box,
    ProjectionSegmenter,
    count_matches,
    page_boxes,
    segment_pages,
)
from hwr.pages.xml_import import import_pages, read_page

from .conftest import REPO, SHARED_DATA

CHROMIUM = Path("/usr/bin/chromium")


def make_page(
    tmp_path: Path, n: int = 6, angle: float = 0.0, columns: int = 1
) -> tuple[Path, list]:
    """A page image with n rendered lines (per column); returns it and each line's box."""
    import random

    rng = random.Random(0)
    page = Image.new("RGB", (1600 * columns, 200 + 110 * n), (245, 242, 235))
    boxes = []
    for c in range(columns):
        for i in range(n):
            line = render_line(SAMPLE_TEXT.splitlines()[i + c * n], "caveat", rng, height=70)
            x, y = 80 + 1600 * c, 100 + 110 * i
            gray = np.asarray(line)
            ink = gray < (np.median(gray) + gray.min()) / 2  # the ink alone, not its paper
            page.paste(line.convert("RGB"), (x, y), Image.fromarray(ink.astype(np.uint8) * 255))
            boxes.append(
                (x, y, x + line.width, y + line.height, SAMPLE_TEXT.splitlines()[i + c * n])
            )
    page = page.rotate(angle, Image.BICUBIC, fillcolor=(245, 242, 235))
    out = tmp_path / "page.png"
    page.save(out)
    return out, boxes


def test_page_xml_import_scales_polygons_and_skips_empty_lines(tmp_path: Path):
    image, boxes = make_page(tmp_path, n=3)
    # Declared at half the real size, as when the XML was made on a downscaled scan.
    lines = "".join(
        f'<TextLine id="l{i}"><Coords points="{x0 // 2},{y0 // 2} {x1 // 2},{y0 // 2} '
        f'{x1 // 2},{y1 // 2} {x0 // 2},{y1 // 2}"/><TextEquiv><Unicode>{text}</Unicode>'
        "</TextEquiv></TextLine>"
        for i, (x0, y0, x1, y1, text) in enumerate(boxes)
    )
    w, h = Image.open(image).size
    (tmp_path / "page.xml").write_text(
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">'
        f'<Page imageFilename="page.png" imageWidth="{w // 2}" imageHeight="{h // 2}">'
        f'<TextRegion id="r1">{lines}<TextLine id="empty"><Coords points="0,0 9,0 9,9 0,9"/>'
        "</TextLine></TextRegion></Page></PcGts>",
        encoding="utf-8",
    )
    page = read_page(tmp_path / "page.xml")
    assert len(page.lines) == 4
    assert page.lines[0].polygon[0] == pytest.approx((boxes[0][0], boxes[0][1]), abs=2)

    csv_path = import_pages([tmp_path / "page.xml"], tmp_path / "out")
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == [b[4] for b in boxes]  # the empty line is skipped
    assert {r["page"] for r in rows} == {"page"}
    crop = Image.open(tmp_path / "out" / rows[0]["file_name"])
    assert abs(crop.width - (boxes[0][2] - boxes[0][0])) <= 16  # the line, not the page
    assert min(crop.convert("L").getdata()) < 120  # ink inside


def test_pages_that_cannot_be_read_are_listed_and_the_rest_imported(tmp_path: Path, capsys):
    """As in a fetched corpus whose largest images did not come: one missing image, one
    broken, one XML that is neither ALTO nor PAGE."""
    image, boxes = make_page(tmp_path, n=2)
    x0, y0, x1, y1, text = boxes[0]
    page = (
        '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">'
        '<Page imageFilename="{name}" imageWidth="0" imageHeight="0"><TextRegion id="r">'
        f'<TextLine id="l"><Coords points="{x0},{y0} {x1},{y0} {x1},{y1} {x0},{y1}"/>'
        f"<TextEquiv><Unicode>{text}</Unicode></TextEquiv></TextLine></TextRegion></Page></PcGts>"
    )
    (tmp_path / "good.xml").write_text(page.format(name=image.name), encoding="utf-8")
    (tmp_path / "gone.xml").write_text(page.format(name="gone.jpg"), encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "broken.xml").write_text(page.format(name="broken.png"), encoding="utf-8")
    (tmp_path / "mets.xml").write_text("<mets/>", encoding="utf-8")

    xmls = sorted(tmp_path.glob("*.xml"))
    csv_path = import_pages(xmls, tmp_path / "out")
    with csv_path.open(encoding="utf-8") as f:
        assert [r["text"] for r in csv.DictReader(f)] == [text]
    with (tmp_path / "out" / "skipped.csv").open(encoding="utf-8") as f:
        skipped = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(skipped) == {"gone.xml", "broken.xml", "mets.xml"}
    assert "no gone.jpg (named in the XML)" in skipped["gone.xml"]
    assert "neither ALTO nor PAGE" in skipped["mets.xml"]
    assert "3 page(s) could not be read" in capsys.readouterr().out


def test_corpora_filed_one_hand_per_folder_keep_their_folders(tmp_path: Path):
    """As HTR-United corpora are: pages with the same name in two folders stay apart, each
    line says its folder (to split by hand), tall lines come out max_height high, and XML
    filed in alto/ beside the images finds them."""
    image, boxes = make_page(tmp_path, n=1)
    x0, y0, x1, y1, _ = boxes[0]
    for hand, xml_dir in (("hand-a", "hand-a"), ("hand-b", "hand-b/alto")):
        (tmp_path / "corpus" / xml_dir).mkdir(parents=True)
        shutil.copy(image, tmp_path / "corpus" / hand / "f1.png")
        (tmp_path / "corpus" / xml_dir / "f1.xml").write_text(
            '<PcGts xmlns="http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15">'
            '<Page imageFilename="f1.png" imageWidth="0" imageHeight="0"><TextRegion id="r">'
            f'<TextLine id="l"><Coords points="{x0},{y0} {x1},{y0} {x1},{y1} {x0},{y1}"/>'
            f"<TextEquiv><Unicode>{hand}</Unicode></TextEquiv></TextLine></TextRegion></Page>"
            "</PcGts>",
            encoding="utf-8",
        )
    xmls = sorted((tmp_path / "corpus").rglob("*.xml"))
    csv_path = import_pages(xmls, tmp_path / "out", max_height=40)
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["text"], r["folder"], r["page"]) for r in rows] == [
        ("hand-a", "hand-a", "hand-a/f1"),
        ("hand-b", "hand-b/alto", "hand-b/alto/f1"),
    ]
    crops = [Image.open(tmp_path / "out" / r["file_name"]) for r in rows]
    assert [c.height for c in crops] == [40, 40] and crops[0].width > 4 * 40
    flat = import_pages(xmls[:1], tmp_path / "flat")  # one folder: named by the folder
    with flat.open(encoding="utf-8") as f:
        assert [(r["folder"], r["page"]) for r in csv.DictReader(f)] == [("hand-a", "f1")]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the project")
def test_alto_import_of_real_pages(tmp_path: Path, capsys):
    xmls = sorted((SHARED_DATA / "pages" / "alto-peraire").glob("*.xml"))
    csv_path = import_pages(xmls, tmp_path)
    assert "skipped 5 x empty text" in capsys.readouterr().out  # 60 TextLines, 5 empty
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 55 and {r["page"] for r in rows} == {x.stem for x in xmls}
    assert all((tmp_path / r["file_name"]).is_file() for r in rows)


@pytest.mark.parametrize(("angle", "columns"), [(0.0, 1), (1.5, 1), (0.0, 2)])
def test_segmenter_finds_each_line_in_reading_order(tmp_path: Path, angle: float, columns: int):
    image, _ = make_page(tmp_path, n=6, angle=angle, columns=columns)
    found = ProjectionSegmenter().segment(Image.open(image).convert("RGB"))
    assert len(found) == 6 * columns
    tops = [b.top for b in found[:6]]
    assert tops == sorted(tops)  # top to bottom, first column first
    if columns == 2:
        assert all(b.right < 1650 for b in found[:6]) and all(b.left > 1500 for b in found[6:])


def test_cli_segment_cuts_a_page_with_the_configured_segmenter(tmp_path: Path):
    image, _ = make_page(tmp_path, n=6)
    hwr = [sys.executable, "-m", "hwr", "segment", str(image), "--classical"]
    proc = subprocess.run(
        [*hwr, "--out", str(tmp_path / "cut")], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "cut" / "lines.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["text"] == "" for r in rows)
    proc = subprocess.run(
        [*hwr, "--finder", "my_finder", "--out", str(tmp_path / "x")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "hwr segment: --finder names a learned line finder" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the project")
def test_segmenter_on_real_pages_matches_most_xml_lines():
    truth_n = found_n = matched = 0
    for xml in sorted((SHARED_DATA / "pages").glob("*/*.xml")):
        page = read_page(xml)
        truth = [Box.around(ln.polygon) for ln in page.lines]
        image = Image.open(page.image).convert("RGB")
        found = [page_boxes(b, image.size) for b in ProjectionSegmenter().segment(image)]
        truth_n, found_n, matched = (
            truth_n + len(truth),
            found_n + len(found),
            matched + count_matches(found, truth),
        )
    assert matched / truth_n >= 0.75 and matched / found_n >= 0.75  # measured: 0.81 / 0.86


def test_predict_reads_lines_and_pages(tmp_path: Path, trocr_miniature: Path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.open(REPO / "line_data/images/line_00000.png").save(inputs / "a_line.png")
    page, _ = make_page(tmp_path, n=8)  # taller than half its width: a page
    page.rename(inputs / "b_page.png")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hwr",
            "predict",
            f"model.name_or_path={trocr_miniature}",
            f"inputs={inputs}",
            f"hydra.run.dir={out}",
            "model.max_new_tokens=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["source"]).name for r in rows] == ["a_line.png"] + ["b_page.png"] * 8
    assert rows[0]["left"] == "" and rows[1]["left"] != ""
    assert all(0.0 < float(r["confidence"]) <= 1.0 for r in rows)
    assert len(json.loads((out / "predictions.json").read_text())) == 9
    assert len((out / "b_page.txt").read_text().splitlines()) == 8


def test_cli_lists_its_verbs():
    proc = subprocess.run(
        [sys.executable, "-m", "hwr", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0
    for verb in ("import-xml", "import-unipen", "segment", "train-finder", "label", "predict"):
        assert verb in proc.stdout


@pytest.fixture
def label_server(tmp_path: Path):
    """A labelling server on a free port over a 3-line CSV, one line already labelled."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        Image.open(REPO / f"line_data/images/line_{i:05d}.png").save(data / f"images/{i}.png")
    (tmp_path / "secret.png").write_bytes(b"not for you")
    (data / "lines.csv").write_text(
        "file_name,text,page\nimages/0.png,,p1\nimages/1.png,Buy milk,p1\nimages/2.png,,p1\n"
        "../secret.png,,p1\n",
        encoding="utf-8",
    )
    store = LabelStore(data / "lines.csv")
    store.predictions = {0: ("Meeting wiht Anna", 0.9), 2: ("The tran", 0.3)}
    server = make_server(store, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data / "lines.csv"
    server.shutdown()
    server.server_close()


def test_label_api_orders_by_confidence_and_serves_only_the_data_folder(label_server):
    url, _ = label_server
    state = json.load(urllib.request.urlopen(f"{url}/api/lines"))
    assert [line["id"] for line in state["lines"]] == [2, 0, 3, 1]  # least sure first
    assert state["labelled"] == 1 and state["total"] == 4
    assert urllib.request.urlopen(f"{url}/image/0").read()[:4] == b"\x89PNG"
    for path in ("/image/3", "/image/99", "/../secret.png", "/images/0.png"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path)
        assert err.value.code == 404


def launch_chromium(playwright):
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_label_page_in_a_real_browser(label_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, csv_path = label_server
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('progress').textContent.includes('of')")
        assert page.is_hidden("#pages")  # a CSV of lines alone: no page to draw on
        page.wait_for_function("document.getElementById('progress').textContent.includes('of')")
        assert page.text_content("#progress") == "1 of 4 labelled"
        assert page.input_value("#text") == "The tran"  # least confident first, pre-filled
        assert "0.30" in page.text_content("#model")
        page.fill("#text", "The train leaves at 7:45 from platform 3.")
        page.press("#text", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('saved')")
        assert page.input_value("#text") == "Meeting wiht Anna"  # on to the next line
        page.press("#text", "Tab")
        page.reload()
        page.wait_for_function("document.getElementById('progress').textContent.includes('of')")
        assert page.text_content("#progress") == "2 of 4 labelled"
        browser.close()
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows[2]["text"] == "The train leaves at 7:45 from platform 3."
    assert rows[1]["text"] == "Buy milk" and rows[0]["text"] == ""


@pytest.fixture
def page_label_server(tmp_path: Path):
    """A labelling server over `hwr segment`'s cut of a 4-line page, its third line missed
    (its row and image taken out, as a segmenter that did not find it leaves the CSV)."""
    image, truth = make_page(tmp_path, n=4)
    csv_path = segment_pages([image], tmp_path / "cut", ProjectionSegmenter())
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and rows[0]["page_image"] == "../page.png"
    boxes = [Box(*map(int, r["box"].split())) for r in rows]
    assert count_matches(boxes, [Box(*t[:4]) for t in truth]) == 4  # boxes on the page
    missed = rows.pop(2)
    (csv_path.parent / missed["file_name"]).unlink()
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    server = make_server(LabelStore(csv_path), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", csv_path, truth[2]
    server.shutdown()
    server.server_close()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    return json.load(urllib.request.urlopen(request))


def test_a_missed_line_is_added_by_drawing_its_box_on_the_page(page_label_server):
    url, csv_path, (left, top, right, bottom, _) = page_label_server
    (page,) = json.load(urllib.request.urlopen(f"{url}/api/pages"))
    assert (page["width"], page["height"]) == (1600, 640) and len(page["boxes"]) == 3
    shown = Image.open(io.BytesIO(urllib.request.urlopen(f"{url}/page/0").read()))
    assert shown.format == "JPEG" and shown.size == (1600, 640)
    for bad, says in [
        ({"box": [10, 10, 10, 300]}, "the box 10 10 10 300 holds no line on a 1600x640 page"),
        ({"box": "x"}, "bad request"),
        ({}, "bad request: 'box'"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(f"{url}/api/pages/0/lines", bad)
        assert err.value.code == 400 and says in json.load(err.value)["error"]
    with pytest.raises(urllib.error.HTTPError) as err:
        post(f"{url}/api/pages/1/lines", {"box": [left, top, right, bottom]})
    assert "no page 1: " in json.load(err.value)["error"]  # the CSV names one page

    reply = post(f"{url}/api/pages/0/lines", {"box": [left, top, right, bottom]})
    assert reply == {"id": 3, "labelled": 0, "total": 4}
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    added = rows[3]
    assert added["page"] == "page" and added["page_image"] == "../page.png"
    assert added["box"] == f"{left} {top} {right} {bottom}" and added["text"] == ""
    line = Image.open(csv_path.parent / added["file_name"])
    assert line.size == (right - left, bottom - top)
    assert min(line.convert("L").getdata()) < 120  # the line's ink, cut from the page
    lines = json.load(urllib.request.urlopen(f"{url}/api/lines"))["lines"]
    assert 3 in [ln["id"] for ln in lines]  # to be labelled like the others
    assert len(json.load(urllib.request.urlopen(f"{url}/api/pages"))[0]["boxes"]) == 4


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_a_missed_line_drawn_in_a_real_browser(page_label_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, csv_path, (left, top, right, bottom, text) = page_label_server
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_function("document.getElementById('pageimg').naturalWidth > 0")
        assert page.locator("#pageview div.found").count() == 3
        shown = page.locator("#pageimg").bounding_box()
        scale = shown["width"] / 1600
        page.mouse.move(shown["x"] + left * scale, shown["y"] + top * scale)
        page.mouse.down()
        page.mouse.move(shown["x"] + right * scale, shown["y"] + bottom * scale, steps=5)
        page.mouse.up()
        page.click("#addline")
        page.wait_for_function("document.getElementById('status').textContent.includes('added')")
        assert page.get_attribute("#image", "src") == "/image/3"  # the new line, to label
        assert page.locator("#pageview div.found").count() == 4
        page.fill("#text", text)
        page.press("#text", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('saved')")
        browser.close()
    with csv_path.open(encoding="utf-8") as f:
        added = list(csv.DictReader(f))[3]
    assert added["text"] == text
    drawn = Box(*map(int, added["box"].split()))
    assert drawn.iou(Box(left, top, right, bottom)) > 0.9  # where the mouse drew it
