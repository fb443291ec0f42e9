"""A learned line finder: a small U-Net marks the middle band of every text line on a
downscaled page; each band, grown back to its line's height, is a line's box.

The classical segmenter (hwr.pages.segment) cuts projection profiles and loses lines that
lean, touch or stand in a margin. This one learns what a line is from pages marked up in
ALTO or PAGE XML, as the field's line finders do (kraken's blla, dhSegment). Marking the
middle of each line, not the whole of it, keeps touching lines apart.

    hwr train-finder 'data.pages=[../src/CREMMA-MSS-19,...]'   # train (conf/finder.yaml)
    python predict.py segmenter=learned ...                     # use it (hwr segment)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import load_file, save
from scipy import ndimage
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm
from transformers import get_scheduler

from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.pages.segment import Box, count_matches
from hwr.pages.xml_import import read_page
from hwr.report import atomic_write, write_json
from hwr.training import find_checkpoint, make_trainer

log = logging.getLogger(__name__)

BAND = (0.3, 0.7)  # the band marked: from 30% to 70% of a line's height, column by column
# A line is cut along the band grown by this much of what it leaves out (crop_line adds
# its margin): chosen by page CER on the training corpora's validation pages (0.6-1.0).
OUTLINE = 0.8
SHIPPED = Path(__file__).resolve().parent.parent / "weights" / "line_finder"
Polygon = Sequence[tuple[float, float]]


def page_array(image: Image.Image, size: int) -> tuple[np.ndarray, float]:
    """The page in gray, its longer side scaled to `size` px, and the scale used."""
    scale = size / max(image.size)
    gray = ImageOps.grayscale(image)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(gray.resize(shape, Image.BILINEAR)), scale


def band_mask(polygons: Sequence[Polygon], shape: tuple[int, int], scale: float) -> np.ndarray:
    """The training target (height x width, 0/1): in every column a line covers, the band
    from BAND[0] to BAND[1] of the line's height there."""
    mask = np.zeros(shape, np.uint8)
    for polygon in polygons:
        if len(polygon) < 3:
            continue
        points = [(x * scale, y * scale) for x, y in polygon]
        box = Box.around(points)
        x0, y0 = max(0, box.left), max(0, box.top)
        x1, y1 = min(shape[1], box.right + 1), min(shape[0], box.bottom + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in points], fill=1)
        inside = np.asarray(canvas, bool)
        columns = inside.any(axis=0)
        top = inside.argmax(axis=0)
        height = inside.shape[0] - inside[::-1].argmax(axis=0) - top
        rows = np.arange(inside.shape[0])[:, None]
        band = (rows >= top + BAND[0] * height) & (rows < top + BAND[1] * height) & columns
        mask[y0:y1, x0:x1] |= band
    return mask


@dataclass(frozen=True)
class Band:
    """A marked band: its pixels' rows and columns at work size."""

    rows: np.ndarray
    cols: np.ndarray

    @property
    def left(self) -> int:
        return int(self.cols.min())

    @property
    def right(self) -> int:
        return int(self.cols.max()) + 1

    @property
    def thickness(self) -> float:
        return len(self.rows) / len(np.unique(self.cols))

    @cached_property
    def line(self) -> tuple[float, float]:
        """The centre line's slope and intercept (a straight fit, made once: joining asks
        each band for it against every other)."""
        if self.right - self.left < 2:
            return 0.0, float(self.rows.mean())
        slope, intercept = np.polyfit(self.cols, self.rows, 1)
        return float(slope), float(intercept)

    def outline(self, up: float, down: float, points: int = 40) -> list[tuple[float, float]]:
        """The line around the band, column by column: its top edge grown `up`, its bottom
        grown `down` (work pixels), at most `points` columns a side, left to right and back."""
        order = np.argsort(self.cols, kind="stable")
        cols, rows = self.cols[order], self.rows[order]
        xs, starts = np.unique(cols, return_index=True)
        tops, bottoms = np.minimum.reduceat(rows, starts), np.maximum.reduceat(rows, starts)
        keep = np.unique(np.linspace(0, len(xs) - 1, min(points, len(xs))).round().astype(int))
        xs, tops, bottoms = xs[keep].astype(float), tops[keep] - up, bottoms[keep] + 1 + down
        xs[-1] += 1  # the right edge of the last column
        top = list(zip(xs, tops, strict=True))
        bottom = list(zip(xs[::-1], bottoms[::-1], strict=True))
        return [(float(x), float(y)) for x, y in top + bottom]

    def centre(self, x: float) -> float:
        """The band's centre line at column x."""
        slope, intercept = self.line
        return slope * x + intercept


def join_bands(bands: list[Band], max_gap: float = 1.5) -> list[Band]:
    """Join bands that continue one another (the gap between them at most `max_gap` line
    heights, their centre lines meeting within half a band): a faint line is often marked
    in pieces, word by word."""
    height = (BAND[1] - BAND[0]) ** -1
    joined: list[Band] = []
    for band in sorted(bands, key=lambda b: b.left):
        t = band.thickness
        best, best_offset = None, 0.5
        for i, other in enumerate(joined):
            gap = band.left - other.right
            reach = max_gap * height * max(t, other.thickness)
            if -t <= gap <= reach:
                offset = abs(other.centre(other.right) - band.centre(band.left))
                offset /= max(t, other.thickness)
                if offset < best_offset:
                    best, best_offset = i, offset
        if best is None:
            joined.append(band)
        else:
            kept = joined[best]
            joined[best] = Band(
                np.concatenate([kept.rows, band.rows]), np.concatenate([kept.cols, band.cols])
            )
    return joined


def bands_to_boxes(
    marked: np.ndarray, scale: float, min_length: float = 1.0, max_gap: float = 1.5
) -> list[Box]:
    """The marked bands (joined where they continue one another, and at least `min_length`
    times the page's median line height long) as their lines' boxes in page pixels, in
    reading order: each band grown above and below by what the band leaves out of a line,
    with the outline a line is cut along."""
    labels, n = ndimage.label(marked, structure=np.ones((3, 3)))
    pixels = np.nonzero(labels)
    order = np.argsort(labels[pixels], kind="stable")
    rows, cols = pixels[0][order], pixels[1][order]
    starts = np.searchsorted(labels[rows, cols], np.arange(1, n + 2))
    bands = [Band(rows[a:b], cols[a:b]) for a, b in itertools.pairwise(starts)]
    grow_up = BAND[0] / (BAND[1] - BAND[0])
    grow_down = (1 - BAND[1]) / (BAND[1] - BAND[0])
    bands = join_bands(bands, max_gap)
    # A speck is short for the page's lines, not for itself: measure by their median.
    line_height = np.median([b.thickness for b in bands]) / (BAND[1] - BAND[0]) if bands else 0
    boxes = []
    for band in bands:
        t = band.thickness
        if band.right - band.left < min_length * line_height:
            continue
        outline = band.outline(OUTLINE * grow_up * t, OUTLINE * grow_down * t)
        boxes.append(
            Box(
                round(band.left / scale),
                max(0, round((band.rows.min() - grow_up * t) / scale)),
                round(band.right / scale),
                round((band.rows.max() + 1 + grow_down * t) / scale),
                polygon=tuple((x / scale, max(0.0, y / scale)) for x, y in outline),
            )
        )
    return reading_order(boxes)


def reading_order(boxes: Sequence[Box]) -> list[Box]:
    """Columns left to right, each top to bottom. Boxes that share half the narrower one's
    width are one column; a column less than half as wide as the widest is a note in the
    margin, read with the column it stands nearest to, where it stands."""
    column = list(range(len(boxes)))

    def root(i: int) -> int:
        while column[i] != i:
            i = column[i]
        return i

    for i, a in enumerate(boxes):
        for j in range(i):
            b = boxes[j]
            shared = min(a.right, b.right) - max(a.left, b.left)
            if shared > 0.5 * min(a.right - a.left, b.right - b.left):
                column[root(i)] = root(j)
    groups: dict[int, list[Box]] = {}
    for i, box in enumerate(boxes):
        groups.setdefault(root(i), []).append(box)
    spans = {k: (min(b.left for b in g), max(b.right for b in g)) for k, g in groups.items()}
    widest = max((hi - lo for lo, hi in spans.values()), default=0)
    main = [k for k, (lo, hi) in spans.items() if hi - lo >= 0.5 * widest]
    for k, (lo, hi) in spans.items():
        if k not in main:
            centre = (lo + hi) / 2
            nearest = min(main, key=lambda m: abs(centre - sum(spans[m]) / 2))
            groups[nearest] += groups.pop(k)
    ordered = sorted(groups.values(), key=lambda g: min(b.left for b in g))
    return [b for g in ordered for b in sorted(g, key=lambda b: b.top + b.bottom)]


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Ronneberger et al.'s U-Net, small: `depth` halvings, `width` channels at full size."""

    def __init__(self, width: int = 8, depth: int = 5) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.multiple = 2**depth
        self.down = nn.ModuleList(
            [_block(1, chans[0])] + [_block(chans[i], chans[i + 1]) for i in range(depth)]
        )
        levels = list(reversed(range(depth)))
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, 2) for i in levels])
        self.merge = nn.ModuleList([_block(2 * chans[i], chans[i]) for i in levels])
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) gray in [-1, 1], H and W multiples of 2**depth -> band logits."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge, strict=True):
            x = merge(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


def to_input(gray: np.ndarray, multiple: int) -> torch.Tensor:
    """A gray page (uint8) as the network's (1, 1, H, W) input, padded white to `multiple`."""
    h, w = gray.shape
    x = torch.from_numpy(np.array(gray)).float().div(127.5).sub(1)[None, None]
    return F.pad(x, (0, -w % multiple, 0, -h % multiple), value=1.0)


@dataclass
class LearnedSegmenter:
    """Lines found by a trained UNet (`path`: a folder written by `save_finder`; the
    shipped one by default), behind the same `segment(image) -> boxes` as the classical."""

    path: str | None = None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        self.net, self.size = load_finder(Path(self.path) if self.path else SHIPPED)

    @torch.inference_mode()
    def marks(self, image: Image.Image) -> tuple[np.ndarray, float]:
        """The band probability map at work size, and the scale from page pixels to it."""
        gray, scale = page_array(image, self.size)
        logits = self.net(to_input(gray, self.net.multiple))[0, 0, : gray.shape[0], : gray.shape[1]]
        return torch.sigmoid(logits).numpy(), scale

    def segment(self, image: Image.Image) -> list[Box]:
        probs, scale = self.marks(image)
        return bands_to_boxes(probs > self.threshold, scale)


def save_finder(net: UNet, size: int, folder: Path) -> Path:
    """config.json + model.safetensors, each written whole or not at all; the weights in
    float16 (half the bytes in every clone; the marks move by less than 0.01)."""
    folder = Path(folder)
    config = {"width": net.head.in_channels, "depth": len(net.up), "size": size, "band": BAND}
    state = {
        k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    atomic_write(folder / "model.safetensors", lambda tmp: tmp.write_bytes(save(state)))
    write_json(folder / "config.json", config)
    return folder


def load_finder(folder: Path) -> tuple[UNet, int]:
    """The network (eval mode) and its page size, from a folder `save_finder` wrote."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{folder}: no line finder here (config.json missing). Train one with "
            "`hwr train-finder`, or leave segmenter.path unset for the shipped one."
        )
    config = json.loads(config_path.read_text())
    net = UNet(config["width"], config["depth"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval(), int(config["size"])


@dataclass
class MarkedPage:
    name: str
    gray: np.ndarray  # uint8, longer side = size
    mask: np.ndarray  # uint8 0/1, same shape
    truth: list[Box]  # the XML's lines, in work pixels


def mark_page(xml: Path, size: int, cache: Path | None = None) -> MarkedPage:
    """One XML page at work size, with its band mask and its lines' boxes; kept in `cache`
    (a folder) once made, since reading a large scan takes longer than a training step."""
    key = hashlib.sha1(f"{Path(xml).resolve()}:{size}:{BAND}".encode()).hexdigest()[:16]
    cached = cache / f"{key}.npz" if cache else None
    if cached and cached.is_file():
        with np.load(cached) as saved:
            truth = [Box(*map(int, row)) for row in saved["truth"]]
            return MarkedPage(str(xml), saved["gray"], saved["mask"], truth)
    page = read_page(xml)
    gray, scale = page_array(open_rgb(page.image), size)
    polygons = [ln.polygon for ln in page.lines if len(ln.polygon) >= 3]
    truth = [Box.around([(x * scale, y * scale) for x, y in p]) for p in polygons]
    marked = MarkedPage(str(xml), gray, band_mask(polygons, gray.shape, scale), truth)
    if cached:
        rows = np.array([(b.left, b.top, b.right, b.bottom) for b in truth], np.int32)
        atomic_write(
            cached,
            lambda tmp: np.savez(tmp, gray=gray, mask=marked.mask, truth=rows),
        )
    return marked


def held_out(name: str, fraction: float, seed: int) -> bool:
    """Whether a page is a validation page: a stable hash of its file, never of its lines."""
    digest = hashlib.sha1(f"{seed}:{Path(name).name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def one_per_image(xmls: Sequence[Path]) -> list[Path]:
    """The first XML of each page image: exports that give each page in ALTO and in PAGE
    (timeuscorpus' alto/ and page/) would count it twice. Unreadable files pass, to be
    reported with the others."""
    seen, unique = set(), []
    for xml in xmls:
        try:
            image = read_page(xml).image.resolve()
        except (FileNotFoundError, ValueError, IndexError, ET.ParseError):
            unique.append(xml)
            continue
        if image not in seen:
            seen.add(image)
            unique.append(xml)
    return unique


class Crops(Dataset):
    """Random crops of marked pages, turned, scaled, lit and blurred a little."""

    def __init__(self, pages: Sequence[MarkedPage], crop: int, per_page: int) -> None:
        self.pages, self.per_page = list(pages), per_page
        white = {tv_tensors.Image: 255, tv_tensors.Mask: 0}
        self.transform = v2.Compose(
            [
                v2.RandomCrop(int(crop * 1.3), pad_if_needed=True, fill=white),
                v2.RandomAffine(degrees=3, scale=(0.75, 1.3), shear=(-5, 5), fill=white),
                v2.CenterCrop(crop),
                v2.ColorJitter(brightness=0.3, contrast=0.4),
                v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.3),
            ]
        )

    def __len__(self) -> int:
        return len(self.pages) * self.per_page

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        page = self.pages[i % len(self.pages)]
        image = tv_tensors.Image(torch.from_numpy(np.array(page.gray))[None])
        mask = tv_tensors.Mask(torch.from_numpy(np.array(page.mask))[None])
        image, mask = self.transform(image, mask)
        return image.float().div(127.5).sub(1), mask.float()


class PageDataModule(L.LightningDataModule):
    """Pages with ALTO or PAGE XML under `pages` (folders, searched recursively; a file
    whose path holds one of `exclude` left out), split by page; train on random crops,
    validate on whole pages."""

    def __init__(
        self,
        pages: Sequence[str],
        size: int = 1024,
        crop: int = 320,
        batch_size: int = 8,
        crops_per_page: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        cache: str | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.cache = Path(cache) if cache else None
        self.exclude = list(exclude)
        self.pages, self.size, self.crop = [Path(p) for p in pages], size, crop
        self.batch_size, self.crops_per_page = batch_size, crops_per_page
        self.val_fraction, self.split_seed, self.num_workers = val_fraction, split_seed, num_workers
        self.splits: dict[str, list[MarkedPage]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        missing = [str(p) for p in self.pages if not p.is_dir()]
        if missing:
            raise UserError(f"data.pages: no such folder(s): {', '.join(missing)}")
        xmls = sorted(
            x
            for folder in self.pages
            for x in folder.glob("**/*.xml")
            if not any(name in str(x) for name in self.exclude)
        )
        xmls = one_per_image(xmls)
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
        marked, skipped = [], []
        for xml in tqdm(xmls, desc="marking pages", unit="page"):
            try:
                page = mark_page(xml, self.size, self.cache)
            except (FileNotFoundError, ValueError, IndexError) as err:
                skipped.append(str(err) if str(xml) in str(err) else f"{xml}: {err}")
                continue
            if page.truth:
                marked.append(page)
        if skipped:
            log.warning("%d XML file(s) skipped, e.g. %s", len(skipped), skipped[0])
        if not marked:
            raise UserError(f"data.pages: no page with lines in {', '.join(map(str, self.pages))}")
        train, val = [], []
        for page in marked:
            (val if held_out(page.name, self.val_fraction, self.split_seed) else train).append(page)
        self.splits = {"train": train, "val": val or train[:1]}
        log.info("%d pages to train on, %d to validate on", len(train), len(self.splits["val"]))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            Crops(self.splits["train"], self.crop, self.crops_per_page),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, MarkedPage):  # a whole page: the module moves what it reads
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=None, collate_fn=lambda page: page)


class FinderModule(L.LightningModule):
    """The UNet trained to mark line bands (binary cross-entropy + Dice); validation finds
    the lines of whole pages and counts those matching the XML's (IoU >= 0.5). `init`, a
    folder `save_finder` wrote (the shipped one: "shipped"), starts from its weights, so
    that a finder tuned on a user's own pages begins from what it already finds."""

    def __init__(
        self,
        width: int = 8,
        depth: int = 5,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        init: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(width, depth)
        if init:
            start, _ = load_finder(SHIPPED if init == "shipped" else Path(init))
            if (len(start.up), start.head.in_channels) != (depth, width):
                raise UserError(
                    f"model.init={init}: a finder of width {start.head.in_channels} and depth "
                    f"{len(start.up)}; set model.width and model.depth to those to start from it."
                )
            self.net.load_state_dict(start.state_dict())
        self.counts = np.zeros(3)  # true lines, found, matched

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(logits)
        dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, target) + dice

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        image, target = batch
        loss = self.loss(self.net(image), target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.counts = np.zeros(3)

    def validation_step(self, page: MarkedPage, _: int) -> None:
        x = to_input(page.gray, self.net.multiple).to(self.device)
        h, w = page.gray.shape
        logits = self.net(x)[..., :h, :w]
        target = torch.from_numpy(page.mask).float().to(self.device)[None, None]
        self.log("val/loss", self.loss(logits, target), batch_size=1)
        found = bands_to_boxes((torch.sigmoid(logits)[0, 0] > 0.5).cpu().numpy(), 1.0)
        self.counts += (len(page.truth), len(found), count_matches(found, page.truth))

    def on_validation_epoch_end(self) -> None:
        truth, found, matched = self.counts
        recall, precision = matched / max(truth, 1), matched / max(found, 1)
        self.log_dict(
            {
                "val/recall": recall,
                "val/precision": precision,
                "val/f1": 2 * recall * precision / max(recall + precision, 1e-9),
            }
        )

    def configure_optimizers(self) -> dict:
        """AdamW, warm-up then cosine over the run (transformers' schedule, as fine-tuning's:
        a resumed run with more epochs stretches it rather than failing)."""
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = get_scheduler("cosine", optimizer, total // 20, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(cfg: DictConfig) -> float:
    """Train a line finder (conf/finder.yaml); its best weights by validation F1 go to the
    run's `line_finder/`. Returns that F1 (what a sweep would maximise)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule: PageDataModule = instantiate(cfg.data)
    ckpt = find_checkpoint(cfg.ckpt_path, run_dir, Path(cfg.paths.outputs) / "finder")
    datamodule.setup()
    module: FinderModule = instantiate(cfg.model)
    trainer = make_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    checkpoint = trainer.checkpoint_callback
    if checkpoint and checkpoint.best_model_path:
        module = FinderModule.load_from_checkpoint(
            checkpoint.best_model_path, map_location="cpu", init=None
        )
    folder = save_finder(module.net.cpu(), datamodule.size, run_dir / "line_finder")
    best = checkpoint.best_model_score if checkpoint else None
    score = float(best) if best is not None else 0.0
    log.info("Line finder (validation F1 %.3f) saved to %s", score, folder)
    return score
