"""Pre-training's lines: rendered ones and real ones from the corpora, as one endless stream.

Learning to read from scratch on a few thousand real lines fails: the decoder learns the
language before the picture. So the model reads an endless stream of rendered lines in
many fonts (hwr.embedded.synth), short lines first if asked, with real lines mixed in,
their share growing as the run goes. Real lines come from corpora (conf/corpus: a folder
with a lines.csv, as `hwr import-xml` writes it), each split by writer (its `writer`
column, else `folder`, else `page`; a hash of the name): about 80% train, 10% val, 10%
test. Validation reads one corpus's val (or test) writers. Page furniture and text outside
the tokenizer's alphabet are left out.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import logging
import multiprocessing
import random
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hwr.data import (
    SPLITS,
    Line,
    LineDataset,
    build_augment,
    collate,
    encode_line,
    eval_dataset,
    line_loader,
    read_lines,
)
from hwr.embedded.synth import TRAIN_FONTS, TextSource, font_files, font_for, render_line
from hwr.embedded.tiny import char_tokenizer, known_languages
from hwr.errors import UserError, require_count

log = logging.getLogger(__name__)


def writer_split(writer: str) -> str:
    """Same writer, same side, on every machine: train, val or test by a hash of the name."""
    bucket = zlib.crc32(writer.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


# Copied at the foot of every Copiste d'un jour page, with a reference line
# ("Nom de référence : imp_wikitexte_0093"): the first model learned to write them where
# it could not read.
COPISTE_CONSENT = (
    "J'ai lu les conditions de participation et j'y consens. Je comprends que mon manuscrit "
    "sera anonymisé et utilisé par BAnQ pour des activités de recherche et développement et "
    "qu'il pourra aussi être publié et partagé sous licence CC-BY pour être utilisé "
    "librement à des fins non commerciales."
)
CONSENT_OWN_WORDS = {
    "banq",
    "consens",
    "anonymise",
    "licence",
    "license",
    "manuscrit",
    "commerciales",
}


def _words(text: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", text.lower())
    return re.findall(r"\w+", "".join(c for c in plain if not unicodedata.combining(c)))


CONSENT_WORDS = set(_words(COPISTE_CONSENT)) | CONSENT_OWN_WORDS


def is_boilerplate(text: str) -> bool:
    """A page's furniture, not writing to learn: a reference (wikitexte_0093) or a piece of
    the consent paragraph. Copied by hand, that comes cut, hyphenated and misspelt, so a
    line counts when most of its words are the paragraph's and one is its own (BAnQ,
    manuscrit, ...), or when it has five words or more and nearly all are the paragraph's.
    """
    if re.search(r"wikitexte", text, re.IGNORECASE):
        return True
    words = _words(text)
    known = sum(w in CONSENT_WORDS for w in words)
    if not words or known < 0.6 * len(words):
        return False
    return bool(CONSENT_OWN_WORDS & set(words)) or (len(words) >= 5 and known >= 0.8 * len(words))


def to_alphabet(text: str, alphabet: set[str]) -> str | None:
    """A transcription in the tokenizer's characters, or None where it cannot be: composed
    accents (NFC), superscript abbreviations as plain letters (Mʳ -> Mr), the hyphen mark
    ¬ as -, odd spaces as spaces; Greek or editorial brackets (⟦ ⟧) leave the line out."""
    out = []
    for ch in unicodedata.normalize("NFC", text):
        if ch not in alphabet:
            ch = "-" if ch == "¬" else " " if ch.isspace() else unicodedata.normalize("NFKC", ch)
        if any(c not in alphabet for c in ch):
            return None
        out.append(ch)
    return "".join(out).strip() or None


def group_column(csv_path: Path) -> str:
    """What to split a corpus by: its writers where it names them, else its folders (one
    document or hand each, as hwr import-xml writes them), else its pages."""
    with csv_path.open(encoding="utf-8-sig") as f:
        columns = next(csv.reader(f), [])
    return next((c for c in ("writer", "folder", "page") if c in columns), "file_name")


def corpus_lines(
    name: str, corpus: Mapping, alphabet: set[str], language: str | None = None
) -> dict[str, list[Line]]:
    """One corpus's lines by side of the writer split, each said to be in `language`: its
    boilerplate, the groups or files its `exclude` matches (a regular expression; one
    document can be a file name's part where the corpus's group is a whole folder) and text
    outside the alphabet left out."""
    csv_path = Path(corpus["path"]).expanduser() / "lines.csv"
    if not csv_path.is_file():
        raise UserError(
            f"data.corpora.{name}: no {csv_path}. {corpus.get('get') or ''}".strip()
            + f" (conf/corpus/{name}.yaml; or leave it out of data/corpora)"
        )
    lines = read_lines(csv_path, group_by=group_column(csv_path), skip_bad_rows=True)
    exclude = corpus.get("exclude")
    sides: dict[str, list[Line]] = {side: [] for side in SPLITS}
    dropped = Counter()
    for line in lines:
        if exclude and re.search(exclude, f"{line.group or ''}\n{line.file_name}", re.MULTILINE):
            dropped["excluded"] += 1
        elif is_boilerplate(line.text):
            dropped["boilerplate"] += 1
        elif (text := to_alphabet(line.text, alphabet)) is None:
            dropped["outside the alphabet"] += 1
        else:
            kept = dataclasses.replace(line, text=text, language=language)
            sides[writer_split(line.group or "")].append(kept)
    left = ", ".join(f"{n} {why}" for why, n in dropped.items())
    log.info(
        "corpus %s: %s%s",
        name,
        ", ".join(f"{side} {len(v)}" for side, v in sides.items()),
        f" (left out {left})" if left else "",
    )
    return sides


class LineStream(IterableDataset):
    """Endless training lines: rendered in `fonts` (up to 8 + 72 x progress / short_first
    characters) or, with a share growing from real_share[0] to real_share[1] with progress,
    real augmented lines (drawn by `weights`, one per line, if given). Rendered text is
    French or English (`sentences`: real text by language), and a model with language tokens
    is told which. `progress` is shared with the workers, which follow the run's curriculum
    by it."""

    def __init__(
        self,
        processor,
        real: LineDataset | None,
        weights: Sequence[float] | None,
        sentences: Mapping[str, Sequence[str]],
        seed: int,
        short_first: float,
        real_share: Sequence[float],
        progress,
        fonts: Sequence[str] = TRAIN_FONTS,
    ) -> None:
        self.processor, self.real, self.sentences = processor, real, sentences
        self.languages = known_languages(processor.tokenizer)
        self.fonts = list(fonts)
        self.cum_weights = list(itertools.accumulate(weights)) if weights else None
        self.seed, self.short_first, self.real_share = seed, short_first, real_share
        self.progress = progress

    def __iter__(self):
        info = get_worker_info()
        seed = self.seed * 1000 + (info.id if info else 0)
        rng, texts = random.Random(seed), TextSource(self.sentences, seed=seed)
        start, end = self.real_share
        lines = range(len(self.real)) if self.real else None
        while True:
            p = self.progress.value
            if lines and rng.random() < start + (end - start) * p:
                yield self.real[rng.choices(lines, cum_weights=self.cum_weights)[0]]
                continue
            ramp = min(1.0, p / self.short_first) if self.short_first else 1.0
            text, language = texts.line(max_chars=round(8 + 72 * ramp))
            image = render_line(text, font_for(text, self.fonts, rng), rng).convert("RGB")
            told = language if language in self.languages else None
            yield encode_line(self.processor, image, text, language=told)


class PretrainDataModule(L.LightningDataModule):
    """Pre-training's lines: the stream (LineStream) for training, one corpus's val or test
    writers for validation (`eval_corpus`, default the first; `eval_split`).

    `corpora` maps a name to {path, share, exclude, ...} (conf/corpus). With a `share` for
    every corpus, real lines are drawn in those shares (a big corpus of a few clerks would
    otherwise lend its words to every unseen hand); else in proportion to their sizes.
    """

    def __init__(
        self,
        corpora: Mapping[str, Mapping],
        processor=None,
        eval_corpus: str | None = None,
        eval_split: str = "val",
        real_share: Sequence[float] = (0.7, 0.8),
        short_first: float = 0.0,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 1,
        max_target_length: int = 128,
        seed: int = 0,
        augment: Mapping[str, Callable | None] | None = None,
        fonts: str | None = None,
    ) -> None:
        super().__init__()
        if not corpora:
            raise UserError(
                "data.corpora is empty: choose corpora, e.g. 'corpus@data.corpora=[copiste]'"
            )
        if eval_split not in (*SPLITS, "all"):
            raise UserError(f"data.eval_split={eval_split}: use one of train, val, test, all")
        if eval_corpus is not None and eval_corpus not in corpora:
            raise UserError(
                f"data.eval_corpus={eval_corpus}: not among data.corpora ({', '.join(corpora)})"
            )
        if len(real_share) != 2 or not all(0.0 <= s <= 1.0 for s in real_share):
            raise UserError(
                f"data.real_share={list(real_share)}: two shares in [0, 1], start and end"
            )
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            require_count(f"data.{name}", value, least)
        # Checkpoints are loaded with weights_only: hyperparameters must be plain types, not
        # Hydra's DictConfig (nor paths).
        corpora = {
            name: {k: str(v) if isinstance(v, Path) else v for k, v in c.items()}
            for name, c in corpora.items()
        }
        real_share = [float(s) for s in real_share]
        self.fonts = list(TRAIN_FONTS)
        if fonts is not None:
            fonts = str(fonts)
            if not (extra := font_files(fonts)):
                raise UserError(
                    f"data.fonts={fonts}: no font files there. Fetch them with "
                    f"`python -m hwr.embedded.synth --get-fonts {fonts}`, or set data.fonts=null"
                )
            self.fonts += extra
        self.save_hyperparameters(ignore=["processor", "augment"])
        self.corpora = corpora
        self.processor = processor
        self.augment = build_augment(augment)
        self.splits: dict[str, list[Line]] | None = None
        self.weights: list[float] | None = None
        # The share of the run done, read by the stream's workers (shared memory).
        self.progress = multiprocessing.Value("d", 0.0)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        tokenizer = self.processor.tokenizer if self.processor is not None else char_tokenizer()
        alphabet, known = set(tokenizer.get_vocab()), known_languages(tokenizer)
        by_corpus = {
            name: corpus_lines(name, c, alphabet, c.get("language") if known else None)
            for name, c in self.corpora.items()
        }
        self.splits = {side: [x for v in by_corpus.values() for x in v[side]] for side in SPLITS}
        shares = [c.get("share") for c in self.corpora.values()]
        if all(s is not None for s in shares):
            pairs = zip(shares, by_corpus.values(), strict=True)
            self.weights = [s / len(v["train"]) for s, v in pairs for _ in v["train"]]
        elif any(s is not None for s in shares):
            raise UserError(
                "data.corpora: give every corpus a share, or none (drawn by size): "
                + ", ".join(f"{n}.share={c.get('share')}" for n, c in self.corpora.items())
            )
        scored = self.hparams.eval_corpus or next(iter(self.corpora))
        self.eval_name = f"{scored} {self.hparams.eval_split}"
        side = self.hparams.eval_split
        self._eval_lines = (
            [x for v in by_corpus[scored].values() for x in v]
            if side == "all"
            else by_corpus[scored][side]
        )
        log.info(
            "Scored: %d lines of %s's %s writers",
            len(self._eval_lines),
            scored,
            self.hparams.eval_split,
        )

    @property
    def eval_lines(self) -> list[Line]:
        assert self.splits is not None, "call setup() first"
        return self._eval_lines

    @property
    def source(self) -> dict[str, str]:
        """The corpora, as a trained model's trained_on.json records them."""
        return {
            name: str(Path(c["path"]).expanduser().resolve()) for name, c in self.corpora.items()
        }

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            steps = trainer.max_steps
            self.progress.value = min(1.0, trainer.global_step / steps) if steps > 0 else 1.0
        return batch

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        train = self.splits["train"]
        real = (
            LineDataset(train, self.processor, self.augment, hp.max_target_length)
            if train
            else None
        )
        sentences: dict[str, list[str]] = {}
        for line in train:
            sentences.setdefault(line.language, []).append(line.text)
        trainer = self.trainer
        # A resumed run (or another process under DDP) draws other lines than the first.
        step, rank = (trainer.global_step, trainer.global_rank) if trainer else (0, 0)
        stream = LineStream(
            self.processor,
            real,
            self.weights,
            sentences,
            hp.seed + step + 7919 * rank,
            hp.short_first,
            hp.real_share,
            self.progress,
            self.fonts,
        )
        return DataLoader(
            stream,
            batch_size=hp.batch_size,
            collate_fn=collate,
            num_workers=hp.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if hp.num_workers else None,
        )

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = eval_dataset(self.eval_lines, self.processor, hp.max_target_length)
        return line_loader(dataset, hp.eval_batch_size, hp.num_workers)
