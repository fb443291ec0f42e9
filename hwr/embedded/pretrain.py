"""Pre-train the embedded model: synthetic handwriting first, real lines mixed in.

    python -m hwr.embedded.pretrain --real ../shared/data/copiste more/lines ... \
        --out outputs/pretrain --minutes 120

Learning to read from scratch on a few thousand real lines fails: the decoder learns
French before the picture. So the model reads an endless stream of rendered lines in
many fonts, short lines first, with real lines mixed in more and more as it goes; and a
CTC loss on the encoder's columns (joint CTC/attention, as speech recognisers train)
makes the encoder see characters from the start. The head (a ViT's StripHead, or the line
encoder's own) is saved with the model: joint CTC/attention decoding reads with it
(hwr.embedded.ctc).

Real lines come from one or more folders with a lines.csv (`hwr import-xml` writes
them), each split by writer (its `writer` column, else `folder`, else `page`; a hash of
the name): ~80% train, ~10% val (the first folder's val writers are scored while
training), ~10% test (`--measure` only). Page furniture and text outside the tokenizer's
alphabet are left out. Training lines are drawn in proportion to each folder's size, or
to its `--real-shares` (a big corpus of a few clerks otherwise lends its words to every
unseen hand). Every --eval-every steps it writes out/last.pt; rerunning the
same command resumes from there. `--init` starts a new run from a saved model (e.g.
`--init embedded` refines the shipped one); `--warm-from` starts a new `--layout` from
a saved model's weights; `--blend` then saves a mix of the two (rerun
a finished run with another --blend to save another mix).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import random
import re
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from operator import methodcaller
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from PIL import ImageFilter
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from hwr.data import LineDataset, collate, encode_line, read_lines
from hwr.decoding import JOINT_WEIGHT, ctc_greedy, read_batch
from hwr.embedded import LAYOUT, LAYOUTS, build_embedded
from hwr.embedded.ctc import add_strip_head, ctc_loss, ctc_reader
from hwr.embedded.synth import HELD_OUT_FONTS, TRAIN_FONTS, TextSource, render_line, synthetic_lines
from hwr.metrics import TextMetrics
from hwr.model import export, load_pretrained, wire_token_ids
from hwr.report import atomic_write


def warm_start(model: nn.Module, donor: nn.Module) -> list[str]:
    """Copy the donor's weights into the model wherever names and shapes match, and a ViT
    strip kernel resized to the new strip (its sum kept, so ink embeds alike): a new layout
    then starts reading where the shipped model stands. Returns the names left fresh."""
    own = model.state_dict()
    taken = {}
    for name, weight in donor.state_dict().items():
        if name not in own:
            continue
        shape = own[name].shape
        if weight.shape == shape:
            taken[name] = weight
        elif name.endswith("patch_embeddings.projection.weight") and weight.shape[:2] == shape[:2]:
            area = weight.shape[2] * weight.shape[3] / (shape[2] * shape[3])
            resized = F.interpolate(weight, size=shape[2:], mode="bilinear", antialias=True)
            taken[name] = resized * area
    model.load_state_dict(taken, strict=False)
    return sorted(own.keys() - taken.keys())


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


def real_augment(height: int, stroke_width: float = 0.3) -> v2.Compose:
    """New writers from the training writers: the model reads the training writers' lines
    almost perfectly (CER ~0.01) long before it reads unseen writers well, so their lines
    are bent (elastic), slanted (shear), shrunk, inked thicker or thinner (a 3x3 minimum or
    maximum: erosion or dilation of the paper, with probability stroke_width) and
    recoloured. Shrunk to 1.2 x the model's height first: the elastic warp is then fast."""
    return v2.Compose(
        [
            v2.Resize(round(1.2 * height)),
            v2.RandomApply([CoarseElastic(alpha=20.0, sigma=4.0, fill=255)], p=0.5),
            v2.RandomAffine(
                degrees=2,
                translate=(0.0, 0.05),
                scale=(0.8, 1.0),
                shear=(-20, 20, 0, 0),
                fill=255,
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
            v2.RandomApply(
                [
                    v2.RandomChoice(
                        [
                            v2.Lambda(methodcaller("filter", ImageFilter.MinFilter(3))),
                            v2.Lambda(methodcaller("filter", ImageFilter.MaxFilter(3))),
                        ]
                    )
                ],
                p=stroke_width,
            ),
            v2.ColorJitter(brightness=(0.7, 1.2), contrast=(0.6, 1.3)),
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 0.8))], p=0.3),
        ]
    )


def writer_split(writer: str) -> str:
    """Same writer, same side, on every machine: train, val or test by a hash of the name."""
    bucket = zlib.crc32(writer.encode()) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


class LineStream(IterableDataset):
    """Endless training lines: rendered in TRAIN_FONTS (lengths growing with progress)
    or, with a share that grows from real_share[0] to real_share[1], real augmented lines
    (drawn by `weights`, one per line, if given)."""

    def __init__(
        self,
        processor,
        real: LineDataset | None,
        weights: Sequence[float] | None,
        sentences: Sequence[str],
        seed: int,
        short_first: float,
        real_share: tuple[float, float],
        progress,
    ) -> None:
        self.processor, self.real, self.sentences = processor, real, sentences
        self.cum_weights = list(itertools.accumulate(weights)) if weights else None
        self.seed, self.short_first, self.real_share = seed, short_first, real_share
        self.progress = progress

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info else 0
        rng = random.Random(self.seed * 1000 + wid)
        texts = TextSource(self.sentences, seed=self.seed * 1000 + wid)
        start, end = self.real_share
        while True:
            p = self.progress()
            if self.real and rng.random() < start + (end - start) * p:
                lines = range(len(self.real))
                yield self.real[rng.choices(lines, cum_weights=self.cum_weights)[0]]
                continue
            ramp = min(1.0, p / self.short_first) if self.short_first else 1.0
            text = texts.line(max_chars=round(8 + 72 * ramp))
            image = render_line(text, rng.choice(TRAIN_FONTS), rng).convert("RGB")
            yield encode_line(self.processor, image, text)


class Progress:
    """Share of the run done: steps or minutes, whichever is further along (picklable, so
    dataloader workers follow the same curriculum by the clock). A resumed run starts
    from the step and the seconds its checkpoint had reached, so rerunning with more
    --steps or --minutes goes on."""

    def __init__(self, steps: int, minutes: float, step: int = 0, spent: float = 0.0) -> None:
        self.steps, self.seconds, self.step, self.spent = steps, minutes * 60, step, spent
        self.t0 = time.time()

    def seconds_spent(self) -> float:
        return self.spent + time.time() - self.t0

    def by_time(self) -> float:
        return self.seconds_spent() / self.seconds

    def __call__(self) -> float:
        return min(1.0, max(self.step / self.steps, self.by_time()))


def add_ctc_head(model: VisionEncoderDecoderModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's CTC head: the line encoder's own, one it already has, or a new StripHead
    over a ViT's strips (model.ctc_head); all are trained and saved with the model."""
    head = ctc_reader(model)
    if head is not None:
        return head
    if model.config.encoder.model_type != "vit":
        raise SystemExit(
            f"--ctc-weight needs an encoder whose outputs run along the line (ViT strips or "
            f"hwr's line encoder), not {model.config.encoder.model_type}: give --ctc-weight 0"
        )
    return add_strip_head(model)


@torch.no_grad()
def score(
    model, processor, dataset: Dataset, batch_size: int = 64, joint: float = 0.0
) -> dict[str, float]:
    """Greedy-read a dataset: CER, WER, accuracy over its lines; the mean loss (teacher
    forced: it tells layouts apart long before they read); the CTC head's CER, if any, and
    with `joint` > 0 the CER of joint CTC/attention decoding at that weight."""
    model.eval()
    device = next(model.parameters()).device
    metrics, ctc, both, losses = TextMetrics(), TextMetrics(), TextMetrics(), []
    head = ctc_reader(model)
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=2):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            encoded = model.encoder(pixel_values=batch["pixel_values"].to(device))
            labels = batch["labels"].to(device)
            losses.append(model(encoder_outputs=encoded, labels=labels).loss.item())
            texts, _ = read_batch(
                model, processor, None, confidence=False, encoder_outputs=encoded, ctc_weight=0
            )
            if head is not None and joint:
                got, _ = read_batch(
                    model,
                    processor,
                    None,
                    confidence=False,
                    encoder_outputs=encoded,
                    ctc_weight=joint,
                )
                both.update(got, batch["text"])
        metrics.update(texts, batch["text"])
        if head is not None:
            ids = ctc_greedy(head(encoded.last_hidden_state), processor.tokenizer.pad_token_id)
            ctc.update(
                [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)],
                batch["text"],
            )
    model.train()
    scores = metrics.compute() | {"loss": sum(losses) / len(losses)}
    if head is not None:
        scores["ctc_cer"] = ctc.compute()["cer"]
        if joint:
            scores["joint_cer"] = both.compute()["cer"]
    return scores


class RenderedLines(Dataset):
    """A fixed set of rendered lines (e.g. in held-out fonts), encoded like LineDataset's."""

    def __init__(self, processor, fonts: Sequence[str], n: int, seed: int) -> None:
        self.processor = processor
        self.items = [
            (im.convert("RGB"), text) for im, text, _ in synthetic_lines(n, fonts, seed=seed)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, text = self.items[i]
        return encode_line(self.processor, image, text, i)


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


def real_datasets(
    folders: Sequence[Path], alphabet: set[str], exclude: str | None = None
) -> tuple[dict[str, list], list[str]]:
    """Real lines from each folder's lines.csv by side of the writer split (boilerplate,
    lines of groups matching `exclude` and text outside the alphabet left out), and the
    training side's texts. Each side holds one (name, lines) per folder."""
    by: dict[str, list] = {"train": [], "val": [], "test": []}
    for folder in folders:
        csv_path = Path(folder) / "lines.csv"
        lines = read_lines(csv_path, group_by=group_column(csv_path), skip_bad_rows=True)
        kept, dropped = [], Counter()
        for line in lines:
            if exclude and re.search(exclude, line.group or ""):
                dropped["excluded"] += 1
            elif is_boilerplate(line.text):
                dropped["boilerplate"] += 1
            elif (text := to_alphabet(line.text, alphabet)) is None:
                dropped["outside the alphabet"] += 1
            else:
                kept.append(dataclasses.replace(line, text=text))
        left = ", ".join(f"{n} {why}" for why, n in dropped.items())
        print(f"{folder}: {len(kept)} lines" + (f" (left out {left})" if left else ""))
        sides = {"train": [], "val": [], "test": []}
        for line in kept:
            sides[writer_split(line.group or "")].append(line)
        for side, lines in sides.items():
            by[side].append((Path(folder).name, lines))
    return by, [line.text for _, lines in by["train"] for line in lines]


def line_weights(train: Sequence[tuple[str, list]], shares: Sequence[float]) -> list[float]:
    """One draw weight per training line, so that each corpus comes up in its share."""
    if len(shares) != len(train):
        raise SystemExit(
            f"--real-shares gives {len(shares)} shares for {len(train)} --real folders: "
            "give one per folder, in the same order"
        )
    pairs = zip(shares, train, strict=True)
    return [share / len(lines) for share, (_, lines) in pairs for _ in lines]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs/pretrain"))
    ap.add_argument(
        "--real",
        type=Path,
        nargs="*",
        default=[],
        help="folders with a lines.csv of real lines; the first one's val writers are scored",
    )
    ap.add_argument(
        "--real-shares",
        type=float,
        nargs="*",
        help="each --real folder's share of the real lines drawn (default: by its size)",
    )
    ap.add_argument("--exclude", help="leave out real lines whose writer/folder/page matches")
    ap.add_argument("--layout", choices=LAYOUTS, default=LAYOUT, help="a fresh model's layout")
    ap.add_argument("--stroke-width", type=float, default=0.3, help="thicker/thinner ink, p")
    ap.add_argument(
        "--warm-from", help="a fresh layout starts from this saved model's weights (e.g. embedded)"
    )
    ap.add_argument("--init", type=Path, help="start from this saved model (folder or name)")
    ap.add_argument("--steps", type=int, default=100_000, help="schedule length in steps")
    ap.add_argument("--minutes", type=float, default=120, help="stop (and save) after this")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ctc-weight", type=float, default=0.5)
    ap.add_argument("--short-first", type=float, default=0.3, help="share of the run to grow lines")
    ap.add_argument("--real-start", type=float, default=0.1, help="real lines' share at the start")
    ap.add_argument("--real-share", type=float, default=0.5, help="real lines' share at the end")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-lines", type=int, default=200, help="rendered held-out-font lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--blend",
        type=float,
        default=1.0,
        help="save (1-B) x --init's weights + B x the trained ones (B < 1 keeps some of --init)",
    )
    ap.add_argument("--chunks", type=Path, help="also save the final model here in <15 MB files")
    ap.add_argument("--measure", action="store_true", help="only score --init on held-out sets")
    ap.add_argument(
        "--joint",
        type=float,
        default=JOINT_WEIGHT,
        help="--measure also reads jointly, the CTC head's share this",
    )
    args = ap.parse_args(argv)
    if args.blend != 1.0 and not args.init:
        ap.error("--blend mixes the trained weights with --init's: give --init")
    if args.warm_from and args.init:
        ap.error("--warm-from starts a fresh --layout, --init goes on with a saved model: give one")

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.init:
        model, processor = load_pretrained(str(args.init), max_new_tokens=100)
    else:
        model, processor = build_embedded(args.seed, args.layout)
        wire_token_ids(model, processor, max_new_tokens=100)
    # Before the warm start, which then fills the head too where the donor has one.
    head = add_ctc_head(model) if args.ctc_weight and not args.measure else None
    if args.warm_from:
        fresh = warm_start(model, load_pretrained(args.warm_from)[0])
        if any(name.startswith("decoder.") for name in fresh):
            raise SystemExit(
                f"--warm-from {args.warm_from}: its decoder or tokenizer differs from the "
                f"embedded model's, so {', '.join(fresh)} would start fresh; warm-start "
                "from an embedded model (e.g. --warm-from embedded)"
            )
        print(f"--warm-from {args.warm_from}: fresh {', '.join(fresh) or 'nothing'}")
    tok = processor.tokenizer
    initial = {k: v.clone() for k, v in model.state_dict().items()} if args.blend != 1.0 else {}
    model.to(device).train()
    real, sentences = real_datasets(args.real, set(tok.get_vocab()), args.exclude)
    evals = {"fonts": RenderedLines(processor, HELD_OUT_FONTS, args.eval_lines, seed=12345)}
    if args.measure:
        for side in ("val", "test"):
            for name, lines in real[side]:
                if lines:
                    evals[f"{side}_{name}"] = LineDataset(lines, processor)
        scores = {k: score(model, processor, d, joint=args.joint) for k, d in evals.items()}
        print(json.dumps(scores, indent=1))
        return
    if real["val"] and real["val"][0][1]:
        evals["val_writers"] = LineDataset(real["val"][0][1], processor)
    if device.type == "cpu" and model.config.encoder.model_type == "vit":
        # On CPU, SDPA's flash-attention backward over the 129 strips is slow: with plain
        # attention the step trains 21% more lines a second (bench/speed.py --only
        # pretrain), a whole run 4% (preparing the lines shares the cores).
        model.encoder.set_attn_implementation("eager")

    params = [p for n, p in model.named_parameters() if "pooler" not in n]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt, progress = args.out / "last.pt", Progress(args.steps, args.minutes)
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        progress = Progress(args.steps, args.minutes, state["step"], state["seconds"])
        print(f"resumed from {ckpt} at step {progress.step}")

    height = processor.image_processor.size["height"]
    train = [line for _, lines in real["train"] for line in lines]
    stream = LineStream(
        processor,
        LineDataset(train, processor, real_augment(height, args.stroke_width)) if train else None,
        line_weights(real["train"], args.real_shares) if args.real_shares else None,
        sentences,
        args.seed + progress.step,
        args.short_first,
        (args.real_start, args.real_share),
        progress,
    )
    loader = DataLoader(
        stream,
        batch_size=args.batch_size,
        collate_fn=collate,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.workers else None,
    )
    with open(args.out / "log.jsonl", "a") as log:
        step = train_loop(args, model, head, processor, opt, loader, evals, progress, log, ckpt)
    model.cpu()
    if args.blend != 1.0:
        # Weight interpolation (robust fine-tuning, "WiSE-FT"): on unseen writers it read
        # better than either end (model card).
        trained = model.state_dict()
        model.load_state_dict(
            {
                k: torch.lerp(initial[k], v, args.blend) if v.is_floating_point() else v
                for k, v in trained.items()
            }
        )
    export(model, processor, args.out / "model")
    if args.chunks:  # the same model in small files, to carry it off a machine with size limits
        model.save_pretrained(args.chunks, max_shard_size="15MB")
        processor.save_pretrained(args.chunks)
    print(f"saved {args.out / 'model'} after step {step}")


def train_step(
    model: VisionEncoderDecoderModel,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    batch: dict,
    opt: torch.optim.Optimizer,
    ctc_weight: float,
    tok,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step in bf16 autocast on cross-entropy (label smoothing 0.1) plus
    ctc_weight x the CTC head's loss; returns both losses."""
    device = next(model.parameters()).device
    pixels = batch["pixel_values"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(pixel_values=pixels, labels=labels)
        ce = F.cross_entropy(
            out.logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=0.1,
        )
        ctc = (
            ctc_loss(head, out.encoder_last_hidden_state, labels, tok)
            if head is not None
            else torch.zeros(())
        )
        loss = ce + ctc_weight * ctc
    opt.zero_grad(set_to_none=True)
    loss.backward()
    # Parameters without a gradient (the unused pooler's) are skipped.
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce, ctc


def train_loop(
    args: argparse.Namespace,
    model: VisionEncoderDecoderModel,
    head: Callable[[torch.Tensor], torch.Tensor] | None,
    processor: TrOCRProcessor,
    opt: torch.optim.Optimizer,
    loader: DataLoader,
    evals: dict[str, Dataset],
    progress: Progress,
    log: TextIO,
    ckpt: Path,
) -> int:
    """Step until progress reaches 1; score and checkpoint every --eval-every steps."""
    tok, step = processor.tokenizer, progress.step

    def lr_at(p: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    if progress() >= 1.0:  # a finished run, rerun: nothing left to train, only to save
        return step
    seen, t_log = 0, time.time()
    for batch in loader:
        p = progress()
        for group in opt.param_groups:
            group["lr"] = lr_at(p)
        ce, ctc = train_step(model, head, batch, opt, args.ctc_weight, tok)
        step += 1
        progress.step = step
        seen += len(batch["labels"])
        done = progress() >= 1.0
        if step % 50 == 0:
            rate = seen / (time.time() - t_log)
            seen, t_log = 0, time.time()
            print(
                f"step {step} p {p:.3f} lr {lr_at(p):.2e} ce {ce.item():.3f} "
                f"ctc {ctc.item():.3f} {rate:.0f} lines/s",
                flush=True,
            )
        if step % args.eval_every == 0 or done:
            scores = {
                f"{k} {m}": v
                for k, d in evals.items()
                for m, v in score(model, processor, d).items()
                if m in ("cer", "ctc_cer", "loss")
            }
            cers = " ".join(f"{k} {v:.4f}" for k, v in scores.items())
            print(f"step {step} {cers}", flush=True)
            log.write(json.dumps({"step": step, "progress": p, **scores}) + "\n")
            log.flush()
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "seconds": progress.seconds_spent(),
            }
            atomic_write(ckpt, partial(torch.save, state))
        if done:
            return step
    return step


if __name__ == "__main__":
    main()
