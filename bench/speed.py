"""Training and reading speed of hwr against the plain way, and its memory, on this machine.

    python bench/speed.py [--quick] [--threads N] [--only TASK ...] [--out bench/results]

Ways that are compared run side by side, each in its own process, loaded and warmed up
once, then timed in turns (a, b, c, a, b, c, ...): whatever else the machine does falls
on all of them alike, so their ratios hold on a busy machine. A row gives the median
lines/s over the turns, their spread (slowest-fastest turn, in % of the median) and the
way's peak memory (its process's largest RSS; the libraries alone take ~0.85 GB). A
ratio is the median of the turns' ratios.

  train   TrOCR-base's architecture (random weights) at batch 2 (and 8):
          (a) transformers' Seq2SeqTrainer fed by torchvision, as TrOCR tutorials write it
              (the seed's recipe); (b) train.py's defaults; (c) train.py in bf16 autocast.
          (b)'s memory includes a validation batch read after training, with the
          optimizer's state still held, as in a real run.
  read    (a) from_pretrained + generate line by line; (b) predict's reading, batched;
          (c) the same in bf16. Decoding is held at NEW_TOKENS tokens (random weights).
  hub     predict's reading of TrOCR-base saved in the hub checkpoint's old files
          against the same weights saved by today's transformers.
  score   the embedded model reading the Copiste lines of its test writers (all 458
          without the pages' boilerplate; the shipped sample without ../shared/data) as
          validation and evaluate.py do (train.py's configs, a Lightning validation)
          against predict's reading of the same lines.
  unseen  the embedded model reading those lines as predict.py ... batch_size=128
          precision=bf16 does, in float32 and bf16 (the weights cast; joint CTC/attention
          decoding, the default for a model with a CTC head), and in bf16 by its decoder
          alone: lines/s and CER. `--threads 2 --only unseen` on this 2-core CPU: how fast
          predict reads there.
  lm      the embedded model reading those lines as predict.py does (float32, greedy and
          beam 4), without and with a language model (hwr.lm, weight 0.3) of the text of
          Copiste's other writers (its pre-training's training writers): lines/s and CER.
  precision  the embedded model on this CPU in each precision: training at batch 32 as
          train.py does (trainer.precision=32-true, bf16-mixed and auto, the default) and
          reading 96 of those lines as predict.py does (precision=fp32, bf16 and auto):
          auto should never be slower than float32.
  pretrain  pre-training the embedded model at batch 16 (CE + CTC, label smoothing): its
          step (a) as a plain PyTorch loop, the old hwr.embedded.pretrain's, (b) as
          train.py experiment=pretrain steps (Lightning; the lines come processed, held in
          memory); (c) a whole experiment=pretrain run, its stream rendering and augmenting
          lines in its worker.
  data    decode + augment + process, as training's DataLoader does (2 workers).
  synth   hwr.embedded.synth rendering training lines, one process.
The last line is `ratios: train X infer Y`: (c)/(a) of TrOCR-base at batch 2.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the ways' progress bars, between the rows
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "copiste" / "lines.csv"
NEW_TOKENS = 24
TASKS = ("train", "read", "hub", "score", "unseen", "lm", "precision", "pretrain", "data", "synth")
PRECISIONS = ("fp32", "bf16", "auto")


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores other processes keep busy, from /proc/stat over a few seconds (this
    process idles meanwhile); 0 where /proc/stat is missing."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    if not Path("/proc/stat").is_file():
        return 0.0
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return (1 - (idle1 - idle0) / max(total1 - total0, 1)) * (os.cpu_count() or 1)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Turns:
    """A way's side of the turns: it calls tick(lines) after each unit of work (a step, a
    read). After `warmup` units it waits for its turn; a turn times `per_turn` units.
    tick returns False when the bench says stop."""

    def __init__(self, conn, warmup: int, per_turn: int) -> None:
        self.conn, self.per_turn = conn, per_turn
        self.left, self.lines, self.start = warmup, 0, None

    def tick(self, lines: int) -> bool:
        if self.start is not None:
            self.lines += lines
        self.left -= 1
        if self.left > 0:
            return True
        if self.start is None:
            self.conn.send(("ready", None))
        else:
            self.conn.send(("turn", (self.lines, time.perf_counter() - self.start)))
        if self.conn.recv() == "stop":
            return False
        self.left, self.lines, self.start = self.per_turn, 0, time.perf_counter()
        return True


def _serve(way: Callable, args: tuple, conn, warmup: int, per_turn: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        result = way(Turns(conn, warmup, per_turn), *args)
        conn.send(("done", (peak_mb(), result)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


@dataclass
class Row:
    model: str
    task: str
    way: str
    speeds: list[float]  # lines/s of each turn
    peak: float
    cer: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.speeds)

    @property
    def spread(self) -> float:
        return (max(self.speeds) - min(self.speeds)) / self.median


def compare(
    model: str,
    task: str,
    ways: dict[str, tuple[Callable, tuple]],
    turns: int,
    threads: int,
    warmup: int = 1,
    per_turn: int = 1,
) -> list[Row]:
    """Start every way, wait until all are warm, then time them in turns."""
    ctx = mp.get_context("fork")
    procs = {}
    for name, (way, args) in ways.items():
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(way, args, theirs, warmup, per_turn, threads))
        proc.start()
        procs[name] = (proc, ours)

    def answer(name: str, expected: str):
        kind, value = procs[name][1].recv()
        if kind != expected:
            for proc, _ in procs.values():
                proc.kill()
            raise RuntimeError(f"{model} {task} {name}: {value if kind == 'error' else kind}")
        return value

    for name in procs:
        answer(name, "ready")
    speeds: dict[str, list[float]] = {name: [] for name in procs}
    for _ in range(turns):
        for name, (_, conn) in procs.items():
            conn.send("go")
            lines, seconds = answer(name, "turn")
            speeds[name].append(lines / seconds)
    rows = []
    for name, (proc, conn) in procs.items():
        conn.send("stop")
        peak, cer = answer(name, "done")
        proc.join()
        rows.append(Row(model, task, name, speeds[name], peak, cer))
        print(row_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def turn_ratio(rows: list[Row], top: str, bottom: str) -> float:
    """Median over turns of top's speed / bottom's (each turn's two ways ran back to back)."""
    a = next(r for r in rows if r.way.startswith(top))
    b = next(r for r in rows if r.way.startswith(bottom))
    return statistics.median(x / y for x, y in zip(a.speeds, b.speeds, strict=True))


# ---- models and lines ----


def build_models(root: Path) -> None:
    """TrOCR-base's architecture saved by today's transformers, and again in the hub's files."""
    from hwr.embedded.synth import SAMPLE_TEXT
    from hwr.embedded.tiny import TROCR_BASE, bpe_tokenizer, save_hub_layout, trocr_layout

    model, processor = trocr_layout(
        bpe_tokenizer(SAMPLE_TEXT.splitlines(), 2000),
        TROCR_BASE["encoder"],
        TROCR_BASE["decoder"],
        (384, 384),
    )
    model.save_pretrained(root / "trocr-base")
    processor.save_pretrained(root / "trocr-base")
    save_hub_layout(root / "trocr-base", root / "trocr-base-hub")


def write_lines(root: Path, n: int | None, unseen: bool = False) -> Path:
    """n real lines (all: None; Copiste, when ../shared/data is there) or the shipped
    sample, as a CSV; unseen: only lines of the writers the embedded model's pre-training
    kept out (its test writers)."""
    from hwr.embedded.stream import is_boilerplate, writer_split

    source = SHARED if SHARED.is_file() else REPO / "line_data" / "lines.csv"
    with source.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if unseen and "writer" in rows[0]:
        rows = [
            r for r in rows if writer_split(r["writer"]) == "test" and not is_boilerplate(r["text"])
        ]
    out = root / ("unseen.csv" if unseen else "lines.csv")
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for r in rows[:n]:
            writer.writerow([(source.parent / r["file_name"]).resolve(), r["text"]])
    return out


def write_lm(root: Path) -> Path:
    """A language model (weight 0.3) of the text of the writers the unseen ones are not
    (Copiste's training writers; the first half of the shipped sample without ../shared)."""
    from hwr.embedded.stream import writer_split
    from hwr.lm import CharLM

    source = SHARED if SHARED.is_file() else REPO / "line_data" / "lines.csv"
    with source.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if "writer" in rows[0]:
        texts = [r["text"] for r in rows if writer_split(r["writer"]) == "train"]
    else:
        texts = [r["text"] for r in rows[: len(rows) // 2]]
    lm = CharLM.estimate(texts)
    lm.weight = 0.3
    lm.save(root / "lm")
    return root / "lm"


def _rows(csv_path: Path, n: int | None = None) -> list[dict]:
    """The first n rows of a line CSV written by write_lines (absolute paths)."""
    with csv_path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))[:n]


# ---- training ways ----


def train_seq2seq(turns: Turns, model_dir: Path, csv_path: Path, batch: int) -> None:
    """The seed's recipe, the way TrOCR fine-tuning tutorials write it."""
    import torch
    from PIL import Image
    from torch.utils.data import Dataset
    from torchvision import transforms as T
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
        TrOCRProcessor,
        VisionEncoderDecoderModel,
        default_data_collator,
    )

    processor = TrOCRProcessor.from_pretrained(model_dir)
    model = VisionEncoderDecoderModel.from_pretrained(model_dir)
    model.config.decoder_start_token_id = processor.tokenizer.eos_token_id
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    transform = T.Compose(
        [
            T.Resize((384, 384)),
            T.RandomRotation(2, fill=255),
            T.ColorJitter(brightness=(0.9, 1.1), contrast=(0.95, 1.05)),
            T.RandomApply([T.GaussianBlur(3, sigma=(0.1, 0.5))], p=0.2),
        ]
    )
    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))

    class LinesDataset(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            image = transform(Image.open(rows[i]["file_name"]).convert("RGB"))
            pixel_values = processor(image, return_tensors="pt").pixel_values.squeeze()
            labels = processor.tokenizer(
                rows[i]["text"], padding="max_length", max_length=128, truncation=True
            ).input_ids
            pad = processor.tokenizer.pad_token_id
            labels = [t if t != pad else -100 for t in labels]
            return {"pixel_values": pixel_values, "labels": torch.tensor(labels)}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not turns.tick(batch):
                control.should_training_stop = True

    with tempfile.TemporaryDirectory() as tmp:
        args = Seq2SeqTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=10**6,
            learning_rate=1e-5,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=LinesDataset(),
            data_collator=default_data_collator,
            callbacks=[Clock()],
        ).train()


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = hydra_compose(config, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def quiet_trainer(cfg, **kwargs):
    from hydra.utils import instantiate

    from hwr.machine import trainer_precision

    return instantiate(
        cfg.trainer,
        precision=trainer_precision(cfg.trainer),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def fit_for(turns: Turns, lines: int, cfg, module, **fit) -> None:
    """train.py's fit (checked as train.py checks it), stopped when the turns are done;
    each step ticks `lines` lines."""
    import lightning as L

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if not turns.tick(lines):
                trainer.should_stop = True

    trainer = quiet_trainer(cfg, callbacks=[Clock()], limit_val_batches=0, max_steps=10**6)
    module.check_trainer(trainer)
    trainer.fit(module, **fit)


def train_hwr(
    turns: Turns, model_dir: Path, csv_path: Path, batch: int, overrides: tuple = ()
) -> None:
    """train.py's path: the real configs, composed and instantiated as train.py does; then
    a validation batch with the optimizer's state still held (what a real run's peak has)."""
    from hydra.utils import instantiate

    cfg = compose(
        "train",
        [
            f"model.name_or_path={model_dir}",
            f"data.csv={csv_path}",
            f"data.batch_size={batch}",
            f"model.max_new_tokens={NEW_TOKENS}",
            "data.max_target_length=128",  # labels as they are: only reading is held short
            "data.allow_unwritable=true",
            "trainer.max_epochs=-1",
            *overrides,
        ],
    )

    module = instantiate(cfg.model, optimizer=cfg.optim)
    datamodule = instantiate(cfg.data, processor=module.processor)
    fit_for(turns, batch, cfg, module, datamodule=datamodule)
    module.model.generation_config.min_new_tokens = NEW_TOKENS
    quiet_trainer(cfg, limit_val_batches=1).validate(module, datamodule=datamodule, verbose=False)


# ---- reading ways ----


def read_line_by_line(turns: Turns, model_dir: Path, csv_path: Path, n: int) -> None:
    """from_pretrained + generate, one line at a time (what pipeline("image-to-text") did)."""
    import torch
    from transformers import TrOCRProcessor, VisionEncoderDecoderModel

    from hwr.images import open_rgb

    processor = TrOCRProcessor.from_pretrained(model_dir)
    model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    images = [open_rgb(r["file_name"]) for r in _rows(csv_path, n)]
    with torch.no_grad():
        while True:
            for image in images:
                pixels = processor(images=image, return_tensors="pt").pixel_values
                ids = model.generate(pixels, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
                processor.batch_decode(ids, skip_special_tokens=True)
            if not turns.tick(len(images)):
                return


def read_predict(
    turns: Turns,
    model_dir: Path,
    csv_path: Path,
    n: int | None,
    precision: str,
    fixed: bool = True,
    batch_size: int | None = None,
    ctc_weight: float | None = None,
    lm_dir: Path | None = None,
    num_beams: int = 1,
) -> float | None:
    """predict.py's reading (hwr.decoding.read_images, predict's batch size unless given, joint
    CTC/attention decoding where the model has a CTC head unless ctc_weight=0), of the
    images as predict opens them; returns the CER of the last read (None when the decoding
    is held at NEW_TOKENS). With lm_dir, reading uses the language model saved there."""

    from hwr.decoding import read_images
    from hwr.images import open_rgb
    from hwr.lm import CharLM
    from hwr.machine import reading_dtype
    from hwr.metrics import TextMetrics
    from hwr.model import load_pretrained

    cfg = compose("predict", [f"model.name_or_path={model_dir}", "inputs=-"])
    model, processor = load_pretrained(str(model_dir), cfg.model.max_new_tokens)
    model.eval().to(reading_dtype(precision, "cpu"))
    if fixed:
        model.generation_config.min_new_tokens = NEW_TOKENS
        model.generation_config.max_new_tokens = NEW_TOKENS
    rows = _rows(csv_path, n)
    lm = CharLM.load(lm_dir) if lm_dir else None
    while True:
        images = [open_rgb(r["file_name"]) for r in rows]
        got, _ = read_images(
            model,
            processor,
            images,
            batch_size or cfg.batch_size,
            num_beams,
            ctc_weight=ctc_weight,
            lm=lm,
        )
        if not turns.tick(len(images)):
            break
    if fixed:  # random weights, held length: no reading to score
        return None
    metrics = TextMetrics()
    metrics.update(got, [r["text"] for r in rows])
    return metrics.compute()["cer"]


def score_validation(turns: Turns, model_dir: Path, csv_path: Path) -> float:
    """What validation and evaluate.py run: a Lightning validation with train.py's configs
    (all lines read, no augmentation); returns the CER."""
    from hydra.utils import instantiate

    cfg = compose("evaluate", [f"model.name_or_path={model_dir}", f"data.csv={csv_path}"])
    datamodule = instantiate(cfg.data)
    datamodule.setup()  # before the processor is set: scoring reads any text, as evaluate.py
    module = instantiate(cfg.model)
    datamodule.processor = module.processor
    trainer = quiet_trainer(cfg)
    while True:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        if not turns.tick(len(datamodule.eval_lines)):
            return float(module.metrics.compute()["cer"])


def pretrain_config(model_dir: Path, corpus: Path, overrides: tuple = ()):
    """train.py experiment=pretrain's configs on one corpus (a folder with lines.csv)."""
    return compose(
        "train",
        [
            "experiment=pretrain",
            f"model.name_or_path={model_dir}",
            "corpus@data.corpora=[]",
            f"+data.corpora.bench.path={corpus}",
            "data.batch_size=16",
            *overrides,
        ],
    )


def pretrain_steps(turns: Turns, model_dir: Path, corpus: Path, way: str) -> None:
    """Pre-training's step on batches of 16 processed lines (held in memory): "plain", a
    hand-written loop as hwr.embedded.pretrain stepped (CE + CTC, AdamW, clipping, plain
    attention; bf16 autocast where the CPU computes in it, as that loop always did, else
    float32), or "lightning", train.py experiment=pretrain's."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader

    from hwr.data import LineDataset, collate, read_lines
    from hwr.embedded.ctc import ctc_loss, ctc_reader
    from hwr.machine import bf16_native

    cfg = pretrain_config(model_dir, corpus)
    module = instantiate(cfg.model, optimizer=cfg.optim)
    lines = LineDataset(read_lines(corpus / "lines.csv")[:64], module.processor)
    batches = list(DataLoader(lines, batch_size=16, collate_fn=collate))
    if way == "lightning":
        fit_for(
            turns, 16, cfg, module, train_dataloaders=DataLoader(batches * 10**4, batch_size=None)
        )
        return
    model, tok = module.model.train(), module.processor.tokenizer
    model.encoder.set_attn_implementation("eager")
    opt = instantiate(cfg.optim)(params=[p for p in model.parameters() if p.requires_grad])
    head = ctc_reader(model)
    bf16 = bf16_native("cpu")[0]
    while True:
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                ce = F.cross_entropy(
                    out.logits.flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.1
                )
                enc = out.encoder_last_hidden_state
                loss = ce + 0.5 * ctc_loss(head, enc, batch["labels"], tok)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if not turns.tick(16):
                return


def pretrain_run(turns: Turns, model_dir: Path, corpus: Path) -> None:
    """A whole train.py experiment=pretrain run: its stream renders and augments lines in
    its worker while the model steps."""
    from hydra.utils import instantiate

    cfg = pretrain_config(model_dir, corpus)
    module = instantiate(cfg.model, optimizer=cfg.optim)
    datamodule = instantiate(cfg.data, processor=module.processor)
    fit_for(turns, 16, cfg, module, datamodule=datamodule)


# ---- data and synthesis ----


def load_data(turns: Turns, model_dir: Path, csv_path: Path) -> None:
    """Decode + augment + process, with the DataLoader settings training uses."""
    from hydra.utils import instantiate
    from transformers import TrOCRProcessor

    cfg = compose("train", [f"data.csv={csv_path}", "data.val_fraction=0.01"])
    dm = instantiate(cfg.data, processor=TrOCRProcessor.from_pretrained(model_dir))
    dm.setup()
    while True:
        for batch in dm.train_dataloader():
            if not turns.tick(len(batch["text"])):
                return


def render(turns: Turns, n: int) -> None:
    """hwr.embedded.synth's lines (Faker text + rendering), n per unit."""
    from hwr.embedded.synth import synthetic_lines

    seed = 0
    while True:
        seed += 1
        for _ in synthetic_lines(n, seed=seed):
            pass
        if not turns.tick(n):
            return


# ---- the run ----


def row_line(r: Row) -> str:
    cer = "" if r.cer is None else f"{r.cer:.4f}"
    return (
        f"| {r.model} | {r.task} | {r.way} | {r.median:.2f} | ±{100 * r.spread / 2:.0f}% | "
        f"{r.peak:.0f} | {cer} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and lines (~10 min)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--threads", type=int, help="torch threads per way (default 1: ratios that hold)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=TASKS,
        help="these tasks alone (results in speed[_quick]_<tasks>.md), e.g. --only unseen",
    )
    args = parser.parse_args()
    only = set(args.only or TASKS)
    turns, batches, n_read = (3, (2,), 2) if args.quick else (5, (2, 8), 8)

    import hydra  # noqa: F401  (imported once here; every way's fork inherits them)
    import lightning  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import hwr.model

    # One thread per way by default: the ratios then compare the ways' work, not how each
    # spreads over cores that another process may hold (beside a busy process, two threads
    # wait for each other at every small step: line-by-line decoding suffers most).
    busy = busy_cores()
    threads = args.threads or 1
    began = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if only & {"train", "read", "hub"}:
            ctx = mp.get_context("fork")  # built in a child: this process stays small
            proc = ctx.Process(target=build_models, args=(root,))
            proc.start()
            proc.join()
        base, hub = root / "trocr-base", root / "trocr-base-hub"
        lines = write_lines(root, 64)
        unseen = write_lines(root, None, unseen=True)
        embedded = hwr.model.embedded_path()

        def run(model, task, ways, at_least=0, **kw):
            rows.extend(compare(model, task, ways, max(turns, at_least), threads, **kw))
            return rows[-len(ways) :]

        train_rows = {}
        for b in batches if "train" in only else ():
            train_rows[b] = run(
                "trocr-base",
                f"train b={b}",
                {
                    "(a) Seq2SeqTrainer": (train_seq2seq, (base, lines, b)),
                    "(b) hwr defaults": (train_hwr, (base, lines, b)),
                    "(c) hwr bf16": (
                        train_hwr,
                        (base, lines, b, ("trainer.precision=bf16-mixed",)),
                    ),
                },
                at_least=5,  # a step's time drifts by ±10%: 3 turns left ratios 16-21% apart
                per_turn=2,
            )
        read_rows: list[Row] = []
        if "read" in only:
            read_rows = run(
                "trocr-base",
                "read",
                {
                    "(a) line by line": (read_line_by_line, (base, lines, n_read)),
                    "(b) hwr batched": (read_predict, (base, lines, 2 * n_read, "fp32")),
                    "(c) hwr batched bf16": (read_predict, (base, lines, 2 * n_read, "bf16")),
                },
            )
        hub_rows: list[Row] = []
        if "hub" in only:
            hub_rows = run(
                "trocr-base",
                "hub",
                {
                    "saved today": (read_predict, (base, lines, n_read, "fp32")),
                    "hub's files": (read_predict, (hub, lines, n_read, "fp32")),
                },
            )
        score_rows: list[Row] = []
        if "score" in only:
            score_rows = run(
                "embedded",
                "score",
                {
                    "validation": (score_validation, (embedded, unseen)),
                    "predict": (read_predict, (embedded, unseen, None, "fp32", False)),
                },
            )
        if "unseen" in only:
            run(
                "embedded",
                "unseen",
                {
                    "float32": (read_predict, (embedded, unseen, None, "fp32", False, 128)),
                    "bf16": (read_predict, (embedded, unseen, None, "bf16", False, 128)),
                    "bf16, decoder alone": (
                        read_predict,
                        (embedded, unseen, None, "bf16", False, 128, 0.0),
                    ),
                },
            )
        if "lm" in only:
            lm_dir = write_lm(root)
            for beams in (1, 4):  # beam search: the first 96 lines (4 lines/s here)
                way = (embedded, unseen, None if beams == 1 else 96, "fp32", False, 64)
                run(
                    "embedded",
                    f"lm, beam {beams}",
                    {
                        "without": (read_predict, (*way, None, None, beams)),
                        "with the LM": (read_predict, (*way, None, lm_dir, beams)),
                    },
                )
        if not args.quick and "train" in only:
            run(
                "embedded",
                "train b=32",
                {
                    "(a) Seq2SeqTrainer": (train_seq2seq, (embedded, lines, 32)),
                    "(b) hwr defaults": (train_hwr, (embedded, lines, 32, ("model=embedded",))),
                    "(c) hwr bf16": (
                        train_hwr,
                        (embedded, lines, 32, ("model=embedded", "trainer.precision=bf16-mixed")),
                    ),
                },
                per_turn=4,
            )
        if "precision" in only:
            on = ("model=embedded", "trainer.precision=")
            run(
                "embedded",
                "train b=32",
                {
                    f"{p}": (train_hwr, (embedded, lines, 32, (on[0], on[1] + p)))
                    for p in ("32-true", "bf16-mixed", "auto")
                },
                per_turn=4,
            )
            run(
                "embedded",
                "read unseen",
                {p: (read_predict, (embedded, unseen, 96, p, False, 128)) for p in PRECISIONS},
            )
        if "pretrain" in only:
            corpus = unseen.parent / "corpus"
            corpus.mkdir(exist_ok=True)
            (corpus / "lines.csv").write_bytes(unseen.read_bytes())
            run(
                "embedded",
                "pretrain b=16",
                {
                    "(a) plain loop, step": (pretrain_steps, (embedded, corpus, "plain")),
                    "(b) experiment=pretrain, step": (
                        pretrain_steps,
                        (embedded, corpus, "lightning"),
                    ),
                    "(c) experiment=pretrain, whole run": (pretrain_run, (embedded, corpus)),
                },
                at_least=5,
                per_turn=4,
            )
        if "data" in only:
            run("any", "data", {"decode+augment+process": (load_data, (base, lines))}, per_turn=8)
        if "synth" in only:
            run("any", "synth", {"render lines": (render, (200,))})

    # Each ratio where its rows were run (--only runs some tasks alone).
    parts = []
    if hub_rows:
        parts.append(f"hub's files / saved today: {turn_ratio(hub_rows, 'hub', 'saved'):.2f}")
    if score_rows:
        parts.append(f"validation / predict: {turn_ratio(score_rows, 'validation', 'predict'):.2f}")
    if train_rows:
        parts.append(
            f"(b) / (a) peak memory at batch 2: {train_rows[2][1].peak / train_rows[2][0].peak:.2f}"
        )
    ratios = ["; ".join(parts)] if parts else []
    if train_rows and read_rows:
        ratios.append(
            f"ratios: train {turn_ratio(train_rows[2], '(c)', '(a)'):.2f} "
            f"infer {turn_ratio(read_rows, '(c)', '(a)'):.2f}"
        )
    from hwr.machine import bf16_native, cpu_name

    table = [
        f"{cpu_name()}: {bf16_native('cpu')[1]}",
        f"torch {torch.__version__}, {threads} threads ({busy:.1f} cores busy with other work "
        f"at the start), {turns} turns, "
        f"{'quick' if args.quick else 'full'} run of {time.perf_counter() - began:.0f} s",
        "",
        "| model | task | way | lines/s | spread | peak MB | CER |",
        "|---|---|---|---|---|---|---|",
        *(row_line(r) for r in rows),
        "",
        *ratios,
    ]
    text = "\n".join(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if args.quick else "speed"
    if args.only:
        name += "_" + "_".join(t for t in TASKS if t in only)
    (args.out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    with (args.out / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "task", "way", "lines_per_s", "spread", "peak_mb", "cer"])
        for r in rows:
            writer.writerow([r.model, r.task, r.way, r.median, r.spread, r.peak, r.cer])
    print(text)


if __name__ == "__main__":
    main()
