"""Read new images: line images, folders of them, or whole pages (segmented first).

    python predict.py model=embedded inputs=path/to/img_or_folder
    python predict.py model.name_or_path=outputs/train/<run>/model inputs=path/to/img_or_folder
    python -m hwr predict model=embedded inputs=...

Writes predictions.csv and predictions.json (every line: text and confidence), and for
each page <page>.txt, its text in reading order, into the run folder. An input that gives
nothing to read (unreadable, too small, a page where no line was found) is listed in
skipped.csv and in the log; the others are read all the same.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from hwr.decoding import check_reading, read_images
from hwr.errors import UserError, require_count
from hwr.images import PAGE_MIN_HEIGHT, is_page, open_rgb, too_small
from hwr.lm import load_lm
from hwr.machine import default_device, reading_dtype
from hwr.model import load_pretrained, set_language
from hwr.pages.segment import Segmenter, crop_lines, page_boxes
from hwr.pages.xml_import import IMAGE_SUFFIXES
from hwr.report import write_json, write_skipped, write_text

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
        raise UserError(f"inputs={path}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    raise UserError(f"inputs={path}: no such file or folder")


def cut_lines(
    paths: list[Path], segmenter: Segmenter, mode: str
) -> tuple[list[Reading], list[Image.Image], dict[str, str]]:
    """Every line to read: line images as they are, pages cut into lines first.

    Also returns the inputs that gave nothing to read, each with the reason.
    """
    readings, images, skipped = [], [], {}
    for path in tqdm(paths, desc="loading", unit="image"):
        try:
            image = open_rgb(path)
        except Exception as e:  # PIL raises many types for broken files
            skipped[str(path)] = f"unreadable image ({type(e).__name__}: {e})"
            continue
        if reason := too_small(image):
            skipped[str(path)] = reason
        elif mode == "pages" or (mode == "auto" and is_page(image)):
            boxes = segmenter.segment(image)
            if not boxes:
                skipped[str(path)] = "read as a page, and no line was found on it"
            for i, box in enumerate(boxes):
                b = page_boxes(box, image.size)
                readings.append(Reading(str(path), i, (b.left, b.top, b.right, b.bottom)))
            images.extend(crop_lines(image, boxes))
        else:
            readings.append(Reading(str(path), 0, None))
            images.append(image)
    return readings, images, skipped


def check_settings(cfg: DictConfig) -> None:
    """Before the model loads: a bad setting should not cost a minute."""
    if OmegaConf.is_missing(cfg, "inputs"):
        raise UserError("inputs is missing: name an image or a folder of them, inputs=path")
    choices = {"segment": ("auto", "pages", "lines"), "precision": ("auto", "fp32", "bf16")}
    for name, allowed in choices.items():
        if cfg[name] not in allowed:
            raise UserError(f"{name}={cfg[name]}: use one of {', '.join(allowed)}")
    require_count("batch_size", cfg.batch_size, 1)
    model = cfg.model
    check_reading(model.num_beams, model.max_new_tokens, model.ctc_weight, model.lm_weight)


def predict(cfg: DictConfig) -> list[Reading]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_settings(cfg)
    paths = find_images(cfg.inputs)
    model, processor = load_pretrained(cfg.model.name_or_path, cfg.model.max_new_tokens)
    if cfg.model.language is not None:
        set_language(model, processor.tokenizer, cfg.model.language)
    lm = load_lm(cfg.model.name_or_path, cfg.model.lm_weight)
    if lm is not None:
        log.info("Reading with the language model of the training text (weight %g)", lm.weight)
    device = default_device() if cfg.device == "auto" else cfg.device
    model.eval().to(torch.device(device), reading_dtype(cfg.precision, device))
    if cfg.model.compile_encoder:
        model.encoder.compile()  # as in training: the encoder only, in place
    if cfg.segment == "auto":
        log.info(
            "segment=auto: an image taller than half its width and %d px high or more is a "
            "page, cut into lines; any other is a line (segment=pages or lines to choose)",
            PAGE_MIN_HEIGHT,
        )
    readings, images, skipped = cut_lines(paths, instantiate(cfg.segmenter), cfg.segment)
    if skipped:
        log.warning(
            "%d input(s) gave nothing to read (listed in skipped.csv):\n%s",
            len(skipped),
            write_skipped(run_dir, skipped),
        )
    if not images:
        raise UserError(f"Nothing to read in inputs={cfg.inputs}: see {run_dir / 'skipped.csv'}")
    texts, confidences = read_images(
        model,
        processor,
        images,
        cfg.batch_size,
        cfg.model.num_beams,
        cfg.model.max_new_tokens,
        ctc_weight=cfg.model.ctc_weight,
        lm=lm,
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
