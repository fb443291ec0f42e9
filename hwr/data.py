"""Line images and their transcriptions: reading and checking the CSV, splitting, batching.

Every row is checked once, before training, so a bad file never surfaces later as a
crash inside a DataLoader worker.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from hwr.embedded.tiny import known_languages, language_id
from hwr.errors import UserError, require_count
from hwr.images import batching_order, line_problem, open_rgb

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Line:
    """One row of the CSV that passed every check."""

    image: Path
    text: str
    row: int  # line number in the CSV file, header = 1
    file_name: str  # as written in the CSV
    split: str | None = None
    group: str | None = None
    size: tuple[int, int] | None = None  # width, height in pixels
    language: str | None = None  # what the decoder is told it writes (hwr.embedded.tiny)


@dataclass(frozen=True)
class BadRow:
    row: int
    file_name: str
    reason: str

    def __str__(self) -> str:
        return f"  line {self.row}: {self.file_name or '(no file name)'}: {self.reason}"


class BadRowsError(UserError):
    """The CSV has rows that cannot be trained on; the message lists every one."""

    def __init__(self, csv_path: Path, bad: Sequence[BadRow], limit: int = 50) -> None:
        self.bad = list(bad)
        shown = "\n".join(str(b) for b in self.bad[:limit])
        more = f"\n  ... and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        super().__init__(
            f"{csv_path}: {len(self.bad)} bad row(s):\n{shown}{more}\n"
            "Fix these rows, or skip them with data.skip_bad_rows=true."
            + (
                "\nText the model cannot write is kept as it is (what it lacks becomes <unk>, "
                "long lines are cut) with data.allow_unwritable=true."
                if any(b.reason.startswith(UNWRITABLE) for b in self.bad)
                else ""
            )
        )


UNWRITABLE = "the model cannot write"


def _check_image(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """Decode the whole image (a truncated file only fails when its pixels are read) as the
    model will see it, and check that it can be a line; also its size."""
    try:
        image = open_rgb(path)
    except Exception as e:  # PIL raises many types for broken files
        return f"unreadable image ({type(e).__name__}: {e})", None
    return line_problem(image), image.size


# Each language's commonest short words, told apart by which a text uses more.
COMMON_WORDS = {
    "en": "the and of to in is that it was for with on as at by he she you my his her have be "
    "this not but from had are will would which",
    "fr": "le la les de des du et un une est que qui dans pour pas au aux il elle je ne se sur "
    "avec ce cette son sa ses mon ma nous vous",
}


def guess_language(texts: Iterable[str]) -> str | None:
    """The language (of COMMON_WORDS) whose common words the texts use most; None if none."""
    common = {language: set(words.split()) for language, words in COMMON_WORDS.items()}
    counts = Counter(
        language
        for text in texts
        for word in re.findall(r"\w+", text.lower())
        for language, known in common.items()
        if word in known
    )
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def text_checker(tokenizer, max_tokens: int) -> Callable[[str], str | None]:
    """A row check for text the tokenizer cannot write: characters it lacks (they would be
    trained as <unk>) or more tokens than the model writes (the label would be cut)."""
    lacks: dict[str, bool] = {}
    # A tokenizer with language tokens writes one before the text: count it.
    told = next(iter(known_languages(tokenizer)), None)

    def check(text: str) -> str | None:
        for ch in set(text) - lacks.keys():
            ids = tokenizer(ch, add_special_tokens=False).input_ids
            lacks[ch] = tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
        missing = list(dict.fromkeys(ch for ch in text if lacks[ch]))  # as they come
        if missing:
            return f"{UNWRITABLE} the character(s) {' '.join(missing)} (not in its tokenizer)"
        n = len(label_ids(tokenizer, text, language=told))
        if n > max_tokens:
            return (
                f"{UNWRITABLE} a line this long: {n} tokens, it writes at most {max_tokens} "
                "(data.max_target_length, which follows model.max_new_tokens); split the line"
            )
        return None

    return check


def read_lines(
    csv_path: str | Path,
    image_column: str = "file_name",
    text_column: str = "text",
    split_column: str = "split",
    group_by: str | None = None,
    skip_bad_rows: bool = False,
    check_text: Callable[[str], str | None] | None = None,
    allow_unwritable: bool = False,
) -> list[Line]:
    """Read and check every row of a line CSV.

    Paths are relative to the CSV's folder (or absolute); a relative path may not leave
    that folder. `check_text` (see `text_checker`) names text the model cannot write: bad
    rows, or with allow_unwritable a warning. Raises BadRowsError naming every bad row
    unless skip_bad_rows is set.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"Line CSV not found: {csv_path} (set data.csv=path/to/lines.csv)")
    root = csv_path.parent.resolve()
    # Decode leniently so that one badly encoded row is reported, not the whole file.
    text = csv_path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    for setting, name in (("data.image_column", image_column), ("data.text_column", text_column)):
        if name not in columns:
            raise UserError(
                f"{csv_path}: no column '{name}' (columns: {', '.join(columns) or 'none'}). "
                f"Name the right one with {setting}=..."
            )
    if group_by and group_by not in columns:
        raise UserError(
            f"{csv_path}: data.group_by={group_by} but there is no such column "
            f"(columns: {', '.join(columns)})."
        )

    lines: list[Line] = []
    bad: list[BadRow] = []
    allowed: list[BadRow] = []
    seen: dict[Path, int] = {}
    start = 2  # the header is line 1
    total = max(text.count("\n") - 1, 0)
    for record in tqdm(reader, total=total, desc=f"checking {csv_path.name}", unit="line"):
        row, start = start, reader.line_num + 1
        file_name = (record.get(image_column) or "").strip()
        label = (record.get(text_column) or "").strip()
        split = (record.get(split_column) or "").strip().lower() or None
        group = (record.get(group_by) or "").strip() if group_by else None
        path, size = Path(file_name), None
        if not path.is_absolute():
            path = (root / path).resolve()
        if not file_name:
            reason = "empty file name"
        elif "\ufffd" in file_name + label:
            reason = "text is not valid UTF-8 (save the CSV as UTF-8)"
        elif not label:
            reason = "empty text"
        elif not Path(file_name).is_absolute() and not path.is_relative_to(root):
            reason = f"path leaves the data folder {root}"
        elif split is not None and split not in SPLITS:
            reason = f"split '{split}' is not one of {', '.join(SPLITS)}"
        elif path in seen:
            reason = f"same image as line {seen[path]}"
        elif not path.is_file():
            reason = f"file not found ({path})"
        else:
            reason, size = _check_image(path)
            reason = reason or (check_text and check_text(label))
        if reason and allow_unwritable and reason.startswith(UNWRITABLE):
            allowed.append(BadRow(row, file_name, reason))
        elif reason:
            bad.append(BadRow(row, file_name, reason))
            continue
        seen[path] = row
        lines.append(Line(path, label, row, file_name, split, group, size))

    if bad and not skip_bad_rows:
        raise BadRowsError(csv_path, bad)
    if bad:
        reasons = Counter(b.reason.split(" (")[0] for b in bad)
        log.warning(
            "%s: skipped %d bad row(s): %s",
            csv_path,
            len(bad),
            "; ".join(f"{n} x {r}" for r, n in reasons.most_common()),
        )
    if allowed:
        log.warning(
            "%s: %d line(s) kept with text the model cannot write (data.allow_unwritable):\n%s",
            csv_path,
            len(allowed),
            "\n".join(str(b) for b in allowed[:20]) + ("\n  ..." if len(allowed) > 20 else ""),
        )
    if not lines:
        raise UserError(f"{csv_path}: no usable rows.")
    return lines


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.5)")


def split_lines(lines: Sequence[Line], val_fraction: float, seed: int) -> dict[str, list[Line]]:
    """Deterministic train/val split; an explicit split column wins, groups stay whole.

    Lines that share a group (e.g. a page) go to the same side, so the validation score
    measures pages the model has not seen. Lines without a group are their own group.
    """
    check_val_fraction(val_fraction)
    out: dict[str, list[Line]] = {s: [] for s in SPLITS}
    free: dict[str, list[Line]] = {}
    for line in lines:
        if line.split:
            out[line.split].append(line)
        else:
            free.setdefault(line.group or f"row:{line.row}", []).append(line)
    keys = sorted(free)
    random.Random(seed).shuffle(keys)
    target = round(val_fraction * sum(len(v) for v in free.values()))
    for n, key in enumerate(keys):
        # The last group trains if nothing else does (two pages: one each side).
        last_for_train = n == len(keys) - 1 and not out["train"]
        side = "val" if len(out["val"]) < target and not last_for_train else "train"
        out[side].extend(free[key])
    if lines and (not out["train"] or not out["val"]):
        empty = "train" if not out["train"] else "val"
        fixes = "add lines, or give a 'split' column with train and val rows"
        if len(free) >= 2:
            fixes = "change data.val_fraction, " + fixes
        elif free:
            fixes = f"the {len(free)} group left to split cannot go to both sides: " + fixes
        raise UserError(
            f"The {empty} split is empty ({len(lines)} lines, {len(free)} groups to split, "
            f"val_fraction={val_fraction}): {fixes}."
        )
    return out


def build_augment(augment: Mapping[str, Callable | None] | None) -> Callable | None:
    """Compose the named transforms (built by Hydra from the config) in order; null = off."""
    steps = [t for t in (augment or {}).values() if t is not None]
    return v2.Compose(steps) if steps else None


class LineDataset(Dataset):
    """Line images as model inputs: (augmented) image -> processor pixels, text -> token ids.

    `order` serves the lines in another order (e.g. `batching_order`); an item's "index" is
    still its line's place in `lines`.
    """

    def __init__(
        self,
        lines: Sequence[Line],
        processor,
        transform: Callable | None = None,
        max_target_length: int = 256,
        order: Sequence[int] | None = None,
    ) -> None:
        self.lines = list(lines)
        self.processor = processor
        self.transform = transform
        self.max_target_length = max_target_length
        self.order = list(range(len(self.lines)) if order is None else order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> dict:
        i = self.order[k]
        line = self.lines[i]
        image = open_rgb(line.image)
        if self.transform is not None:
            image = self.transform(image)
        return encode_line(
            self.processor, image, line.text, i, self.max_target_length, line.language
        )


def label_ids(
    tokenizer, text: str, max_length: int | None = None, language: str | None = None
) -> list[int]:
    """A line's target tokens as TrOCR was pre-trained on them: `t1 .. tn </s>`, no `<s>`;
    `<lang> t1 .. tn </s>` with a language, so the decoder learns to write what it is told
    (reading puts the language token after the start token) and to name the language
    itself when it is not told.

    fairseq's TrOCR (microsoft/unilm, trocr/data.py: collate_tokens with
    move_eos_to_beginning=True) fed the decoder `</s> t1 .. tn` and trained it to write
    `t1 .. tn </s>`; the model shifts these labels right behind decoder_start_token_id
    (`</s>`) to make that input. The tokenizer's own `<s> t1 .. tn </s>` would first teach
    the model to write `<s>` after `</s>`, and move every character one place on
    (huggingface/transformers#22768). A line cut at max_length still ends with `</s>`.
    """
    told = language_id(tokenizer, language, "a line's language")
    head = [] if told is None else [told]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if max_length is not None:
        ids = ids[: max_length - 1 - len(head)]
    return [*head, *ids, tokenizer.eos_token_id]


def encode_line(
    processor,
    image: Image.Image,
    text: str,
    index: int = 0,
    max_target_length: int = 256,
    language: str | None = None,
) -> dict:
    """One line as the model takes it: processor pixels, token ids; index and text kept."""
    labels = label_ids(processor.tokenizer, text, max_target_length, language)
    return {
        "pixel_values": processor(images=image, return_tensors="pt").pixel_values[0],
        "labels": torch.tensor(labels),
        "index": index,
        "text": text,
    }


def collate(batch: list[dict]) -> dict:
    """Stack images; pad labels to the longest in the batch with -100 (ignored by the loss)."""
    labels = torch.nn.utils.rnn.pad_sequence(
        [b["labels"] for b in batch], batch_first=True, padding_value=-100
    )
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": labels,
        "index": torch.tensor([b["index"] for b in batch]),
        "text": [b["text"] for b in batch],
    }


def eval_dataset(lines: Sequence[Line], processor, max_target_length: int) -> LineDataset:
    """Lines to score, served in reading order (similar widths together) where sizes are
    known; an item's index is still its place in `lines`."""
    order = batching_order([line.size for line in lines]) if all(x.size for x in lines) else None
    return LineDataset(lines, processor, None, max_target_length, order)


def line_loader(
    dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, min_lines: int = 0
) -> DataLoader:
    """Batches of lines. Training (`shuffle`) draws at least `min_lines` a pass; scoring
    reads each line once, also under DDP."""
    sampler = None
    if shuffle and len(dataset) < min_lines:
        # Shuffled passes over the set, back to back, until the epoch is long enough.
        sampler = RandomSampler(dataset, num_samples=min_lines)
        shuffle = False
    elif not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning's default sampler pads shards with repeated lines; each line once here,
        # so scores over all processes are scores over the set.
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate,
    )


class CoarseElastic(v2.ElasticTransform):
    """torchvision's elastic warp, its displacement field drawn on a grid `sigma` px apart
    and upsampled instead of blurred at full size: the same smooth wobble (its size and
    reach match), ten times cheaper. The full-size blur took most of the time spent
    preparing a real line, more than the model's step on it."""

    def make_params(self, flat_inputs: list) -> dict[str, torch.Tensor]:
        height, width = TF.get_size(flat_inputs[0])
        step = self.sigma[0]
        grid = (max(5, math.ceil(height / step)), max(5, math.ceil(width / step)))
        noise = TF.gaussian_blur(torch.rand(1, 2, *grid) * 2 - 1, [9, 9], [1.0, 1.0]) / step
        field = F.interpolate(noise, size=(height, width), mode="bilinear")
        scale = torch.tensor([self.alpha[0] / width, self.alpha[1] / height]).view(1, 2, 1, 1)
        return {"displacement": (field * scale).permute(0, 2, 3, 1)}


class InkWidth(v2.Transform):
    """Ink thicker or thinner, with probability p: a 3x3 minimum (dark ink spreads) or
    maximum (it thins) filter over the image."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p = p

    def make_params(self, flat_inputs: list) -> dict:
        if torch.rand(()) >= self.p:
            return {"filter": None}
        spread = torch.rand(()) < 0.5
        return {"filter": ImageFilter.MinFilter(3) if spread else ImageFilter.MaxFilter(3)}

    def transform(self, inpt: Image.Image, params: dict) -> Image.Image:
        return inpt if params["filter"] is None else inpt.filter(params["filter"])


class LineDataModule(L.LightningDataModule):
    """The line CSV, checked and split, with augmentations on training images only.

    `eval_split` picks the lines that validation (and evaluate.py) reads: "val" (the
    held-out side of the split), "test" (rows marked test), "train" or "all".

    `train_lines` trains on the first N training lines in an order fixed by `subset_seed`,
    so a smaller subset is inside every larger one (a learning curve); validation is
    untouched. An epoch draws at least `min_epoch_lines` lines (a small set repeats, with
    new augmentations), so few lines still make enough steps between validations.

    `language`: what a model with language tokens is told the lines are (None: guessed from
    their words, `guess_language`); the resolved one is kept as `self.language`.
    """

    def __init__(
        self,
        csv: str,
        processor=None,
        image_column: str = "file_name",
        text_column: str = "text",
        split_column: str = "split",
        group_by: str | None = None,
        val_fraction: float = 0.5,
        split_seed: int = 0,
        eval_split: str = "val",
        skip_bad_rows: bool = False,
        allow_unwritable: bool = False,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_target_length: int = 128,
        train_lines: int | None = None,
        subset_seed: int = 0,
        min_epoch_lines: int = 0,
        language: str | None = None,
        augment: Mapping | None = None,
    ) -> None:
        super().__init__()
        # Checked here, before any model loads: a bad setting should not cost a minute.
        if eval_split not in (*SPLITS, "all"):
            raise UserError(f"data.eval_split={eval_split}: use one of train, val, test, all")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_target_length", max_target_length, 2),
            ("train_lines", 1 if train_lines is None else train_lines, 1),
            ("min_epoch_lines", min_epoch_lines, 0),
        ):
            require_count(f"data.{name}", value, least)
        check_val_fraction(val_fraction)
        self.save_hyperparameters(ignore=["processor", "augment"])
        self.processor = processor
        self.augment = build_augment(augment)
        self.splits: dict[str, list[Line]] | None = None
        self.language = language

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        hp = self.hparams
        # Text is checked against the tokenizer of the model being trained; scoring compares
        # strings, so evaluate.py (no processor at setup) reads any text.
        check = (
            text_checker(self.processor.tokenizer, hp.max_target_length)
            if self.processor is not None
            else None
        )
        lines = read_lines(
            hp.csv,
            hp.image_column,
            hp.text_column,
            hp.split_column,
            hp.group_by,
            hp.skip_bad_rows,
            check,
            hp.allow_unwritable,
        )
        if self.processor is not None and known_languages(self.processor.tokenizer):
            if self.language is None:
                self.language = guess_language(line.text for line in lines)
                log.info("The lines' language, by their words: %s (model.language)", self.language)
            lines = [replace(line, language=self.language) for line in lines]
        self.splits = split_lines(lines, hp.val_fraction, hp.split_seed)
        self.splits["all"] = lines
        if hp.train_lines is not None:
            order = list(self.splits["train"])
            random.Random(hp.subset_seed).shuffle(order)
            if hp.train_lines > len(order):
                log.warning(
                    "data.train_lines=%d, but the training split has %d lines: training on all",
                    hp.train_lines,
                    len(order),
                )
            self.splits["train"] = order[: hp.train_lines]
        log.info(
            "%d lines: %s. Scored: %s %d (data.eval_split)",
            len(lines),
            ", ".join(f"{k} {len(self.splits[k])}" for k in SPLITS),
            hp.eval_split,
            len(self.eval_lines),
        )

    @property
    def eval_lines(self) -> list[Line]:
        assert self.splits is not None, "call setup() first"
        return self.splits[self.hparams.eval_split]

    @property
    def source(self) -> str:
        """Where the lines come from, as a trained model's trained_on.json records it."""
        return str(Path(self.hparams.csv).resolve())

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = LineDataset(
            self.splits["train"], self.processor, self.augment, hp.max_target_length
        )
        return line_loader(dataset, hp.batch_size, hp.num_workers, True, hp.min_epoch_lines)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = eval_dataset(self.eval_lines, self.processor, hp.max_target_length)
        return line_loader(dataset, hp.eval_batch_size or hp.batch_size, hp.num_workers)
