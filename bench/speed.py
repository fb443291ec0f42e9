"""Training and inference speed of hwr against the plain way, side by side, in one run.

    python bench/speed.py [--quick] [--out bench/results]

Rows (lines per second, peak memory), for TrOCR-base's architecture (random weights:
speed does not depend on them) and for the embedded model (hwr/weights/embedded):
  train (a) transformers' Seq2SeqTrainer fed by torchvision augmentations + TrOCRProcessor,
            written the way its tutorials do; (b) hwr's train.py path with its defaults;
            (c) hwr with its fastest settings (bf16 autocast).
  infer (a) from_pretrained + generate line by line (what pipeline("image-to-text") did;
            transformers 5 removed it); (b) hwr batched reading; (c) hwr's fastest CPU
            path (bf16 autocast, batched).
  data   decode + augment + process alone, as the training DataLoader does it.
  synth  hwr.synth rendering synthetic handwriting lines (text included), one process.
  read   the embedded model reading real lines of writers it never saw (Copiste test
         writers; the shipped sample without ../shared/data) as they come, greedy,
         batches of 128: lines/s and CER, in float32 and in bf16 (what the fast path costs).
With random weights the decoded length is fixed (min = max new tokens) so every row
decodes as many tokens. Each row runs in its own (forked) process, so its peak memory is
its own.
The last line is `ratios: train X.XX infer Y.YY`: (c)/(a) for TrOCR-base at batch 2.
--quick measures the first batch size only, fewer steps and lines (under 5 minutes).
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from queue import Empty

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "copiste" / "lines.csv"
NEW_TOKENS = 24


def build_models(root: Path) -> dict[str, Path]:
    from hwr.embedded import embedded_path
    from hwr.synth import SAMPLE_TEXT
    from hwr.tiny import TROCR_BASE, bpe_tokenizer, trocr_layout

    base = root / "trocr-base"
    model, processor = trocr_layout(
        bpe_tokenizer(SAMPLE_TEXT.splitlines(), 2000),
        TROCR_BASE["encoder"],
        TROCR_BASE["decoder"],
        (384, 384),
    )
    model.save_pretrained(base)
    processor.save_pretrained(base)
    return {"trocr-base": base, "embedded": embedded_path()}


def write_lines(root: Path, n: int, unseen: bool = False) -> Path:
    """n real lines (Copiste, when ../shared/data is there) or the shipped sample, as a CSV;
    unseen: only lines of the writers the embedded model's pre-training kept out."""
    from hwr.pretrain import writer_split

    source = SHARED if SHARED.is_file() else REPO / "line_data" / "lines.csv"
    with source.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if unseen and "writer" in rows[0]:
        rows = [r for r in rows if writer_split(r["writer"]) == "test"]
    rows = rows[:n]
    out = root / ("unseen.csv" if unseen else "lines.csv")
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        writer.writerows([(source.parent / r["file_name"]).resolve(), r["text"]] for r in rows)
    return out


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- training rows: each returns (lines/s, peak MB) ----


def train_seq2seq(model_dir: Path, csv_path: Path, batch: int, steps: int) -> tuple[float, float]:
    """The original recipe, the way TrOCR fine-tuning tutorials write it."""
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

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = Seq2SeqTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps + 1,
            learning_rate=1e-5,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
        )
        Seq2SeqTrainer(
            model=model,
            args=args,
            train_dataset=LinesDataset(),
            data_collator=default_data_collator,
            callbacks=[Clock()],
        ).train()
    return batch * steps / (stamps[-1] - stamps[0]), peak_mb()


def train_hwr(
    model_dir: Path, csv_path: Path, batch: int, steps: int, fast: bool, extra: tuple = ()
) -> tuple[float, float]:
    """train.py's path: the real configs, composed and instantiated as train.py does."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    overrides = [
        f"model.name_or_path={model_dir}",
        f"data.csv={csv_path}",
        f"data.batch_size={batch}",
        "trainer.max_epochs=-1",
        *extra,
    ] + (["trainer.precision=bf16-mixed"] if fast else [])
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    stamps: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())

    module = instantiate(cfg.model, optimizer=cfg.optim)
    datamodule = instantiate(cfg.data, processor=module.processor)
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[Clock()],
        max_steps=steps + 1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    return batch * steps / (stamps[-1] - stamps[0]), peak_mb()


# ---- inference rows ----


def _lines(csv_path: Path, n: int) -> tuple[list, list[str]]:
    """The first n lines' images and texts."""
    from hwr.images import open_rgb

    with csv_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [open_rgb(r["file_name"]) for r in rows], [r["text"] for r in rows]


def infer_line_by_line(model_dir: Path, csv_path: Path, n: int) -> tuple[float, float]:
    import torch
    from transformers import TrOCRProcessor, VisionEncoderDecoderModel

    processor = TrOCRProcessor.from_pretrained(model_dir)
    model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    images, _ = _lines(csv_path, n + 1)
    with torch.no_grad():
        for i, image in enumerate(images):
            if i == 1:
                start = time.perf_counter()  # the first line warms up
            pixels = processor(images=image, return_tensors="pt").pixel_values
            ids = model.generate(pixels, min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS)
            processor.batch_decode(ids, skip_special_tokens=True)
    return n / (time.perf_counter() - start), peak_mb()


def infer_hwr(model_dir: Path, csv_path: Path, n: int, fast: bool) -> tuple[float, float]:
    """predict.py's reading: hwr.model.read_images, batches of 16."""
    from hwr.model import load_pretrained, read_images

    model, processor = load_pretrained(str(model_dir), NEW_TOKENS)
    model.eval()
    model.generation_config.min_new_tokens = NEW_TOKENS
    images, _ = _lines(csv_path, n)
    read_images(model, processor, images[:2], bf16=fast)  # warm-up
    start = time.perf_counter()
    read_images(model, processor, images, 16, bf16=fast)
    return n / (time.perf_counter() - start), peak_mb()


def read_real_lines(model_dir: Path, csv_path: Path, n: int, fast: bool) -> tuple:
    """Read real lines as they come (no fixed length): lines/s, peak MB and CER."""
    from hwr.metrics import TextMetrics
    from hwr.model import load_pretrained, read_images

    model, processor = load_pretrained(str(model_dir))
    model.eval()
    images, texts = _lines(csv_path, n)
    read_images(model, processor, images[:2], bf16=fast)  # warm-up
    start = time.perf_counter()
    got, _ = read_images(model, processor, images, 128, bf16=fast)
    speed = len(images) / (time.perf_counter() - start)
    metrics = TextMetrics()
    metrics.update(got, texts)
    return speed, peak_mb(), metrics.compute()["cer"]


def data_loading(model_dir: Path, csv_path: Path, n: int) -> tuple[float, float]:
    """Decode + augment + process, with the DataLoader settings training uses."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import TrOCRProcessor

    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("train", overrides=[f"data.csv={csv_path}", "data.val_fraction=0.01"])
    dm = instantiate(cfg.data, processor=TrOCRProcessor.from_pretrained(model_dir))
    dm.setup()
    loader = dm.train_dataloader()
    count, start = 0, None
    while count < n:
        for batch in loader:
            start = start or time.perf_counter()
            count += len(batch["text"])
    return count / (time.perf_counter() - start), peak_mb()


def render_synthetic(n: int) -> tuple[float, float]:
    """hwr.synth's lines (Faker text + rendering) in one process, after a warm-up that opens
    the fonts and draws the common glyphs once, as a long pre-training run has."""
    from hwr.synth import synthetic_lines

    for _ in synthetic_lines(300, seed=1):
        pass
    start = time.perf_counter()
    for _ in synthetic_lines(n, seed=2):
        pass
    return n / (time.perf_counter() - start), peak_mb()


def _child(fn, args, queue) -> None:
    queue.put(fn(*args))


def run_row(fn, *args) -> tuple[float, float]:
    """Run one measurement in a forked process; returns (lines/s, peak MB).

    The parent has imported the libraries but run nothing, so a fork starts fast and
    small, and the peak memory a row reports is that row's.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{getattr(fn, 'func', fn).__name__}{args[2:]} failed") from None
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and lines (<5 min)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    # --quick: batch 2 only, one timed step, 8 lines (each row costs a process start
    # and loading 1.3 GB; under 5 minutes on 2 cores).
    steps, n_infer, batches = (1, 8, (2,)) if args.quick else (4, 16, (2, 8))

    import hydra  # noqa: F401  (imported once here; every row's fork inherits them)
    import lightning  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import hwr.model  # noqa: F401

    rows = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = run_row(build_models, root)  # in a child: this process stays small
        csv_path = write_lines(root, 64)
        for arch, model_dir in models.items():
            arch_batches = batches if arch == "trocr-base" else (8, 32)[: len(batches)]
            if arch == "embedded":
                n_real = 64 if args.quick else 256
                unseen = write_lines(root, n_real, unseen=True)
                for name, fast in (("float32", False), ("bf16", True)):
                    speed, mem, cer = run_row(read_real_lines, model_dir, unseen, n_real, fast)
                    rows.append((arch, "read unseen writers", name, speed, mem, cer))
            for b in arch_batches:
                arch_steps = steps if arch == "trocr-base" else 10
                for name, fn in (
                    ("(a) Seq2SeqTrainer", partial(train_seq2seq)),
                    ("(b) hwr defaults", partial(train_hwr, fast=False)),
                    ("(c) hwr bf16", partial(train_hwr, fast=True)),
                ):
                    speed, mem = run_row(fn, model_dir, csv_path, b, arch_steps)
                    rows.append((arch, f"train b={b}", name, speed, mem, None))
                    print(rows[-1], file=sys.stderr, flush=True)
            if arch == "trocr-base":
                fn = partial(train_hwr, fast=True, extra=("optim=adafactor",))
                speed, mem = run_row(fn, model_dir, csv_path, batches[0], steps)
                rows.append(
                    (
                        arch,
                        f"train b={batches[0]}",
                        "(c) hwr bf16, optim=adafactor",
                        speed,
                        mem,
                        None,
                    )
                )
            n = n_infer if arch == "trocr-base" else 64
            for name, fn in (
                ("(a) line by line", infer_line_by_line),
                ("(b) hwr batched", partial(infer_hwr, fast=False)),
                ("(c) hwr batched bf16", partial(infer_hwr, fast=True)),
            ):
                speed, mem = run_row(fn, model_dir, csv_path, n)
                rows.append((arch, "infer", name, speed, mem, None))
                print(rows[-1], file=sys.stderr, flush=True)
        speed, mem = run_row(data_loading, models["trocr-base"], csv_path, 64)
        rows.append(("any", "data", "decode+augment+process, 2 workers", speed, mem, None))
        speed, mem = run_row(render_synthetic, 500 if args.quick else 2000)
        rows.append(("any", "synth", "render lines, 1 process", speed, mem, None))

    def find(arch, task, prefix):
        return next(r[3] for r in rows if r[0] == arch and r[1] == task and r[2].startswith(prefix))

    table = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'quick' if args.quick else 'full'} run of {time.perf_counter() - began:.0f} s",
        "",
        "| model | task | way | lines/s | peak MB | CER |",
        "|---|---|---|---|---|---|",
        *(
            f"| {a} | {t} | {w} | {s:.2f} | {m:.0f} | {'' if c is None else f'{c:.4f}'} |"
            for a, t, w, s, m, c in rows
        ),
    ]
    train_ratio = find("trocr-base", f"train b={batches[0]}", "(c)") / find(
        "trocr-base", f"train b={batches[0]}", "(a)"
    )
    infer_ratio = find("trocr-base", "infer", "(c)") / find("trocr-base", "infer", "(a)")
    data_ratio = find("any", "data", "decode") / max(
        find("trocr-base", f"train b={batches[0]}", "(c)"), 1e-9
    )
    table += [
        "",
        f"data loading feeds {data_ratio:.0f}x what TrOCR-base training (c) consumes",
        f"ratios: train {train_ratio:.2f} infer {infer_ratio:.2f}",
    ]
    text = "\n".join(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "speed_quick" if args.quick else "speed"
    (args.out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    with (args.out / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("model", "task", "way", "lines_per_s", "peak_mb", "cer"), *rows])
    print(text)


if __name__ == "__main__":
    main()
