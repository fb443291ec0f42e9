"""A local labelling page: each line image with the model's reading pre-filled; type or
correct it, press Enter, and it is saved into the CSV at once.

    python -m hwr label line_data/lines.csv [--model outputs/train/<run>/model] [--port N]

Lines the model is least sure of come first: they teach it most. Where the CSV came from
`hwr segment` (its `page_image` and `box` columns), the page is shown with the lines found
on it, and a line the segmenter missed is added by drawing a box around it. The server
listens on 127.0.0.1 only and serves only the images the CSV names: lines inside its
folder, and the pages they were cut from.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.pages.segment import Box, box_text
from hwr.report import atomic_write, write_text

PAGE = Path(__file__).with_name("label.html")
PAGE_VIEW = 2000  # pages are sent with their longer side at most this many pixels


class LabelStore:
    """The CSV in memory; each change is written back atomically before it is acknowledged."""

    def __init__(self, csv_path: Path, image_column: str = "file_name", text_column: str = "text"):
        self.path = Path(csv_path)
        self.root = self.path.parent.resolve()
        self.image_column, self.text_column = image_column, text_column
        with self.path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            self.columns = list(reader.fieldnames or [])
            self.rows = list(reader)
        if image_column not in self.columns:
            raise ValueError(f"{self.path}: no column '{image_column}'")
        if text_column not in self.columns:
            self.columns.append(text_column)
        self.done = {i for i, r in enumerate(self.rows) if (r.get(text_column) or "").strip()}
        self.predictions: dict[int, tuple[str, float]] = {}
        self.read = None  # the model's reader, once pre-filled: a drawn line is read too
        self.lock = threading.Lock()
        self.pages = list(dict.fromkeys(r["page_image"] for r in self.rows if r.get("page_image")))

    def image_path(self, i: int) -> Path | None:
        """The row's image, if it lies inside the data folder; None otherwise."""
        if not 0 <= i < len(self.rows):
            return None
        path = (self.root / self.rows[i][self.image_column]).resolve()
        return path if path.is_relative_to(self.root) and path.is_file() else None

    def prefill(self, model_name: str, batch_size: int = 16) -> None:
        """Read every unlabelled line with the model (and its language model, if it was
        tuned with one), for the text box and the order."""
        from hwr.decoding import read_images
        from hwr.lm import load_lm
        from hwr.model import ModelUnavailableError, load_pretrained

        try:
            model, processor = load_pretrained(model_name)
        except ModelUnavailableError as e:
            e.setting = "--model"  # the offline options as hwr label takes them
            raise
        model.eval()
        todo = [i for i in range(len(self.rows)) if i not in self.done and self.image_path(i)]
        images = [open_rgb(self.image_path(i)) for i in todo]
        lm = load_lm(model_name)

        def read(images: list[Image.Image]) -> list[tuple[str, float]]:
            texts, confidences = read_images(model, processor, images, batch_size, lm=lm)
            return list(zip(texts, confidences, strict=True))

        self.read = read
        self.predictions = dict(zip(todo, read(images), strict=True))

    def order(self) -> list[int]:
        """Unlabelled lines first, least confident first; then the labelled ones."""
        todo = [i for i in range(len(self.rows)) if i not in self.done]
        todo.sort(key=lambda i: self.predictions.get(i, ("", 1.0))[1])
        return todo + sorted(self.done)

    def state(self) -> dict:
        lines = []
        for i in self.order():
            prediction, confidence = self.predictions.get(i, ("", None))
            text = (self.rows[i].get(self.text_column) or "").strip()
            lines.append(
                {
                    "id": i,
                    "file": self.rows[i][self.image_column],
                    "text": text if i in self.done else prediction,
                    "prediction": prediction,
                    "confidence": confidence,
                    "labelled": i in self.done,
                }
            )
        return {
            "csv": str(self.path),
            "labelled": len(self.done),
            "total": len(self.rows),
            "lines": lines,
        }

    def accept(self, i: int, text: str) -> None:
        if not 0 <= i < len(self.rows):
            raise KeyError(i)
        with self.lock:
            self.rows[i][self.text_column] = text.strip()
            if text.strip():
                self.done.add(i)
            else:
                self.done.discard(i)
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buf.getvalue())

    def page_path(self, n: int) -> Path | None:
        """The n-th page image the CSV names (relative to its folder), if it is a file."""
        if not 0 <= n < len(self.pages):
            return None
        path = (self.root / self.pages[n]).resolve()
        return path if path.is_file() else None

    def page_state(self) -> list[dict]:
        """Each page with its size and the boxes of its lines, for drawing a missed one."""
        pages = []
        for n, page in enumerate(self.pages):
            path = self.page_path(n)
            if path is None:
                continue
            with Image.open(path) as image:
                width, height = image.size
            boxes = [
                [int(v) for v in r["box"].split()]
                for r in self.rows
                if r.get("page_image") == page and len((r.get("box") or "").split()) == 4
            ]
            pages.append(
                {"id": n, "name": Path(page).name, "width": width, "height": height, "boxes": boxes}
            )
        return pages

    def add_line(self, n: int, box: Box) -> int:
        """Cut `box` (page pixels) from the n-th page as a new line image beside the others,
        add its row to the CSV (read by the model, if there is one) and return its id."""
        path = self.page_path(n)
        if path is None:
            raise ValueError(f"no page {n}: {self.path} names {len(self.pages)} page image(s)")
        page = open_rgb(path)
        box = Box(
            max(0, box.left),
            max(0, box.top),
            min(page.width, box.right),
            min(page.height, box.bottom),
        )
        if box.right - box.left < 2 or box.bottom - box.top < 2:
            raise ValueError(
                f"the box {box_text(box)} holds no line on a {page.width}x{page.height} page"
            )
        line = page.crop((box.left, box.top, box.right, box.bottom))
        with self.lock:
            first = next(r for r in self.rows if r.get("page_image") == self.pages[n])
            stem, taken = Path(self.pages[n]).stem, {r[self.image_column] for r in self.rows}
            names = (f"images/{stem}_added_{k:03d}.png" for k in itertools.count())
            name = next(x for x in names if x not in taken and not (self.root / x).exists())
            atomic_write(self.root / name, lambda tmp: line.save(tmp, "PNG"))
            row = first | {self.image_column: name, self.text_column: "", "box": box_text(box)}
            self.rows.append(row)
            self._write()
            i = len(self.rows) - 1
        if self.read:
            self.predictions[i] = self.read([line])[0]
        return i


def make_handler(store: LabelStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args) -> None:  # keep the terminal quiet
            pass

        def _send(self, status: int, body: bytes, mime: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", mime)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, data: object, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/api/lines":
                self._json(store.state())
            elif self.path == "/api/pages":
                self._json(store.page_state())
            elif self.path.startswith("/page/") and self.path[6:].isdigit():
                # small enough to draw on at once; boxes come back in page pixels
                self._image(store.page_path(int(self.path[6:])), "JPEG", PAGE_VIEW)
            elif self.path.startswith("/image/") and self.path[7:].isdigit():
                # as the model sees it, in a format every browser shows (TIFF too)
                self._image(store.image_path(int(self.path[7:])), "PNG")
            else:
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)

        def _image(self, path: Path | None, format: str, size: int | None = None) -> None:
            if path is None:
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                return
            image = open_rgb(path)
            if size:
                image.thumbnail((size, size))
            encoded = io.BytesIO()
            image.save(encoded, format)
            self._send(HTTPStatus.OK, encoded.getvalue(), f"image/{format.lower()}")

        def do_POST(self) -> None:
            parts = self.path.strip("/").split("/")
            line = len(parts) == 3 and parts[:2] == ["api", "lines"]
            page = len(parts) == 4 and parts[:2] == ["api", "pages"] and parts[3] == "lines"
            if not ((line or page) and parts[2].isdigit()):
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if line:
                    store.accept(int(parts[2]), str(body["text"]))
                    reply = {}
                else:
                    left, top, right, bottom = (round(float(v)) for v in body["box"])
                    reply = {"id": store.add_line(int(parts[2]), Box(left, top, right, bottom))}
            except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
                self._json({"error": f"bad request: {e}"}, HTTPStatus.BAD_REQUEST)
                return
            self._json(reply | {"labelled": len(store.done), "total": len(store.rows)})

    return Handler


def make_server(store: LabelStore, port: int = 8765) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", port), make_handler(store))


def newest_tuned_model(csv_path: Path, outputs: Path = Path("outputs")) -> Path:
    """The model/ folder of the newest train.py run on this CSV (its trained_on.json says)."""
    from hwr.model import TRAINED_ON

    target = str(Path(csv_path).resolve())
    found = [
        record.parent
        for record in Path(outputs).glob(f"**/model/{TRAINED_ON}")
        if json.loads(record.read_text(encoding="utf-8")).get("csv") == target
    ]
    if not found:
        raise UserError(
            f"--model tuned: no model under {outputs}/ was trained on {csv_path}. Train one "
            f"(python train.py data.csv={csv_path}), or name a model: --model PATH"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def serve(csv_path: Path, model: str | None = None, port: int = 8765, open_browser: bool = True):
    """Serve the labelling page until Ctrl-C. model="tuned": the newest run on this CSV."""
    store = LabelStore(csv_path)
    if model == "tuned":
        model = str(newest_tuned_model(csv_path))
        print(f"Pre-filling with {model}, the newest model tuned on {csv_path}")
    if model:
        store.prefill(model)
    server = make_server(store, port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"Labelling {csv_path}: {len(store.done)} of {len(store.rows)} lines labelled.")
    print(f"Open {url} (Ctrl-C to stop; every accepted line is already saved).")
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
