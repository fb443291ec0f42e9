"""Read new images: line images, folders of them, or whole pages (segmented first).

    python predict.py model.name_or_path=outputs/train/<run>/model inputs=path/to/img_or_folder
    python -m hwr predict model.name_or_path=... inputs=...

Writes predictions.csv and predictions.json (every line: text and confidence), and for
each page <page>.txt, its text in reading order, into the run folder.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

from hwr.model import load_pretrained, read_images
from hwr.report import write_json, write_text
from hwr.segment import Segmenter, crop_lines, page_boxes
from hwr.xml_import import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class Reading:
    source: str  # the input image
    line: int  # reading order within the source (0 for a line image)
    box: tuple[int, int, int, int] | None  # where on the page, for a page
    text: str = ""
    confidence: float = 0.0


def find_images(inputs: str | Path) -> list[Path]:
    """An image, or every image under a folder (sorted)."""
    path = Path(inputs)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if found:
            return found
        raise FileNotFoundError(f"inputs={path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    raise FileNotFoundError(f"inputs={path}: no such file or folder")


def is_page(image: Image.Image) -> bool:
    """Line images are wide and short; anything taller than half its width is a page."""
    return image.height > 0.5 * image.width


def cut_lines(
    paths: list[Path], segmenter: Segmenter, mode: str
) -> tuple[list[Reading], list[Image.Image]]:
    """Every line to read: line images as they are, pages cut into lines first."""
    if mode not in ("auto", "pages", "lines"):
        raise ValueError(f"segment={mode}: use auto, pages or lines")
    readings, images = [], []
    for path in tqdm(paths, desc="loading", unit="image"):
        with Image.open(path) as img:
            image = img.convert("RGB")
        if mode == "pages" or (mode == "auto" and is_page(image)):
            boxes = segmenter.segment(image)
            for i, box in enumerate(boxes):
                b = page_boxes(box, image.size)
                readings.append(Reading(str(path), i, (b.left, b.top, b.right, b.bottom)))
            images.extend(crop_lines(image, boxes))
        else:
            readings.append(Reading(str(path), 0, None))
            images.append(image)
    return readings, images


def predict(cfg: DictConfig) -> list[Reading]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    model, processor = load_pretrained(cfg.model.name_or_path, cfg.model.max_new_tokens)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={cfg.precision}: use fp32 or bf16")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(torch.device(auto if cfg.device == "auto" else cfg.device))
    if cfg.model.compile_encoder:
        model.encoder.compile()  # as in training: the encoder only, in place
    readings, images = cut_lines(find_images(cfg.inputs), instantiate(cfg.segmenter), cfg.segment)
    texts, confidences = read_images(
        model,
        processor,
        images,
        cfg.batch_size,
        cfg.model.num_beams,
        cfg.model.max_new_tokens,
        bf16=cfg.precision == "bf16",
    )
    for reading, text, conf in zip(readings, texts, confidences, strict=True):
        reading.text, reading.confidence = text, round(conf, 4)
    write_outputs(run_dir, readings)
    return readings


def write_outputs(run_dir: Path, readings: list[Reading]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["source", "line", "left", "top", "right", "bottom", "text", "confidence"])
    for r in readings:
        writer.writerow([r.source, r.line, *(r.box or ("", "", "", "")), r.text, r.confidence])
    write_text(run_dir / "predictions.csv", buf.getvalue())
    write_json(run_dir / "predictions.json", [asdict(r) for r in readings])
    pages: dict[str, list[Reading]] = {}
    for r in readings:
        if r.box is not None:
            pages.setdefault(r.source, []).append(r)
    for source, lines in pages.items():
        text = "\n".join(r.text for r in sorted(lines, key=lambda r: r.line)) + "\n"
        write_text(run_dir / f"{Path(source).stem}.txt", text)
    log.info("%d lines (%d pages) read -> %s", len(readings), len(pages), run_dir)


# The project's conf/ beside the package (this is also the entry of `python -m hwr predict`).
@hydra.main(
    version_base="1.3",
    config_path=str(Path(__file__).resolve().parents[1] / "conf"),
    config_name="predict",
)
def main(cfg: DictConfig) -> None:
    logging.getLogger("lightning").handlers.clear()
    predict(cfg)
