"""One fine-tuning run: score the base model, fine-tune, score the tuned model, export, report."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from hwr.data import LineDataModule
from hwr.decoding import read_images
from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.lm import LM_NAME, CharLM, choose_weight, read_texts
from hwr.machine import rebalance, trainer_precision
from hwr.metrics import TextMetrics
from hwr.model import export, set_language
from hwr.module import TrOCRModule
from hwr.report import write_json, write_report

log = logging.getLogger(__name__)


class ExceptionCheckpoint(L.Callback):
    """Save checkpoints/on_exception.ckpt when training stops on an error or Ctrl-C.

    Lightning's OnExceptionCheckpoint also saved runs that had not trained a step (every
    failed run left 42 MB behind), and while one is attached `fit(ckpt_path=None)` resumes
    from any checkpoint it finds, with a warning: this one does neither.
    """

    def __init__(self, dirpath: str | Path, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if trainer.state.fn == TrainerFn.FITTING and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)


class ShareCores(L.Callback):
    """Between batches, take this process's share of the cores again (hwr.machine): another
    hwr process may have started or ended."""

    def on_train_batch_start(self, *args, **kwargs) -> None:
        rebalance()

    def on_validation_batch_start(self, *args, **kwargs) -> None:
        rebalance()


def trained_steps(checkpoint: Path) -> int:
    """How many optimizer steps a Lightning checkpoint holds (read without loading weights)."""
    return torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=False).get(
        "global_step", 0
    )


def find_checkpoint(ckpt_path: str | None, run_dir: Path, outputs: Path) -> str | None:
    """Resolve `ckpt_path`: None, a file, or "last".

    "last" is the newest last.ckpt or on_exception.ckpt of this run, else of any run
    under `outputs`, that has trained at least one step.
    """
    if not ckpt_path:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file.")
        return str(ckpt_path)
    names = ("last.ckpt", "on_exception.ckpt")
    found = [run_dir / "checkpoints" / n for n in names if (run_dir / "checkpoints" / n).is_file()]
    found = found or [p for n in names for p in outputs.glob(f"**/checkpoints/{n}")]
    found = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    newest = next((p for p in found if trained_steps(p) > 0), None)
    if newest is None:
        raise UserError(
            f"ckpt_path=last: no checkpoint of a run that trained in {run_dir} or under "
            f"{outputs}. Give the checkpoint's path instead: "
            "ckpt_path=outputs/.../checkpoints/last.ckpt"
        )
    log.info("Resuming from %s", newest)
    return str(newest)


def make_trainer(cfg: DictConfig) -> L.Trainer:
    """The run's Trainer: cfg.trainer with cfg.callbacks and cfg.logger, its precision
    resolved for this machine (hwr.machine)."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    logger = instantiate(cfg.logger) if cfg.logger else False
    return instantiate(
        cfg.trainer, precision=trainer_precision(cfg.trainer), callbacks=callbacks, logger=logger
    )


def train(cfg: DictConfig) -> float:
    """Run the whole job of train.py; returns the tuned validation CER (what sweeps minimise)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)

    # Settings, then the model, then every row (its text against the model's tokenizer),
    # all before a Trainer runs: a mistake costs seconds and leaves no checkpoint.
    datamodule = instantiate(cfg.data)
    ckpt = find_checkpoint(cfg.ckpt_path, run_dir, Path(cfg.paths.outputs))
    module: TrOCRModule = instantiate(cfg.model, optimizer=cfg.optim)
    datamodule.processor = module.processor
    datamodule.setup()
    # model.language, or guessed from the lines' words (pre-training's lines carry their own)
    if (language := getattr(datamodule, "language", None)) is not None:
        set_language(module.plain_model, module.processor.tokenizer, language)
    trainer = make_trainer(cfg)
    module.check_trainer(trainer)

    if ckpt is None:
        log.info("Scoring the base model %s", cfg.model.name_or_path)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        module.base_result = {
            "metrics": module.metrics.compute(),
            "predictions": dict(module.predictions),
        }
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if not (best and module.validated_at == trainer.global_step == trained_steps(Path(best))):
        # Unless the last validation was the best one (its scores and weights are in hand),
        # read the validation lines again with the best weights.
        trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    tuned = {"metrics": module.metrics.compute(), "predictions": dict(module.predictions)}
    if module.base_result is None:
        log.warning(
            "%s holds no base score (saved before one was taken); reporting tuned only", ckpt
        )
    results = (
        {"base": module.base_result, "tuned": tuned} if module.base_result else {"tuned": tuned}
    )
    if not trainer.is_global_zero:  # under DDP, one process writes the run's files
        return tuned["metrics"]["cer"]
    lm, lm_settings = None, None
    if cfg.model.lm_weight != 0:
        lm, lm_settings, with_lm = language_model(
            cfg, module, datamodule, trainer.strategy.root_device
        )
        results[f"tuned + {LM_NAME}"] = with_lm or tuned  # weight 0: it reads as without
    trained_on = {
        "csv": datamodule.source,
        "train_images": [str(line.image) for line in datamodule.splits["train"]],
    }
    export(module.merged_model(), module.processor, run_dir / "model", trained_on, lm)

    settings = {
        "model": str(cfg.model.name_or_path),
        "optim": OmegaConf.to_container(cfg.optim),
        "data": {
            k: cfg.data.get(k)
            for k in (
                "csv",
                "batch_size",
                "val_fraction",
                "split_seed",
                "group_by",
                "eval_split",
                "train_lines",
                "subset_seed",
            )
        },
        "freeze": list(cfg.model.freeze),
        "adapter": OmegaConf.to_container(cfg.model.adapter) if cfg.model.adapter else None,
        "augment": [k for k, v in (cfg.data.augment or {}).items() if v],
        "max_epochs": cfg.trainer.max_epochs,
        "epochs_trained": trainer.current_epoch,
        "precision": str(trainer.precision),
        "seed": cfg.seed,
        "n_train": len(datamodule.splits["train"]),
        "n_eval": len(datamodule.eval_lines),
        "best_checkpoint": best,
        "lm": lm_settings,
    }
    metrics = {name: r["metrics"] for name, r in results.items()}
    write_json(run_dir / "metrics.json", {**metrics, "settings": settings})
    table = write_report(run_dir, datamodule.eval_lines, results)
    if isinstance(trainer.logger, L.pytorch.loggers.TensorBoardLogger):
        trainer.logger.log_hyperparams(
            {"model": settings["model"], "lr": cfg.optim.lr, "batch_size": cfg.data.batch_size},
            {f"hp/{name}_{k}": v for name, m in metrics.items() for k, v in m.items()},
        )
    log.info("Validation scores (%s)\n%s\nWritten to %s", datamodule.source, table, run_dir)
    return metrics[f"tuned + {LM_NAME}" if lm else "tuned"]["cer"]


def language_model(
    cfg: DictConfig, module: TrOCRModule, datamodule: LineDataModule, device: torch.device
) -> tuple[CharLM, dict, dict | None]:
    """The language model of the training split's text (and lm.texts), never of the lines
    it is scored on; its settings, with the weight chosen on lm.tune_lines of the
    validation lines (unless model.lm_weight names one) and those lines' names; the tuned
    model's reading of every validation line with it (None if the weight chosen is 0).
    """
    texts = [line.text for line in datamodule.splits["train"]] + read_texts(cfg.lm.texts)
    lm = CharLM.estimate(texts, cfg.lm.order)
    model = module.merged_model().eval().to(device)
    lines = datamodule.eval_lines
    m = cfg.model

    def read(with_lm: CharLM | None, rows: list[int]) -> list[str]:
        return read_images(
            model,
            module.processor,
            [open_rgb(lines[i].image) for i in rows],
            cfg.data.eval_batch_size,
            m.num_beams,
            m.max_new_tokens,
            ctc_weight=m.ctc_weight,
            lm=with_lm,
        )[0]

    grid, rows = [], []
    lm.beams = m.num_beams
    if m.lm_weight is None:
        rows = random.Random(cfg.seed).sample(range(len(lines)), min(cfg.lm.tune_lines, len(lines)))
        log.info(
            "Choosing the language model's weight: reading %d validation lines at %d settings",
            len(rows),
            1 + len(cfg.lm.weights) * len(cfg.lm.bonuses),
        )
        grid = choose_weight(
            lm,
            lambda with_lm: read(with_lm, rows),
            [lines[i].text for i in rows],
            cfg.lm.weights,
            cfg.lm.bonuses,
        )
        log.info("Language model weight %g, bonus %g:\n%s", lm.weight, lm.bonus, grid_table(grid))
    else:
        lm.weight = m.lm_weight
    settings = {
        "order": lm.order,
        "lines": lm.lines,
        "weight": lm.weight,
        "bonus": lm.bonus,
        "beams": lm.beams,
        "grid": grid,
        "tuned_on": [lines[i].file_name for i in rows],
    }
    if not lm.weight:
        return lm, settings, None
    metrics = TextMetrics(sync=False)  # rank 0 alone, under DDP
    every = list(range(len(lines)))
    texts = read(lm, every)
    per_line = metrics.update(texts, [line.text for line in lines]).tolist()
    predictions = dict(zip(every, zip(texts, per_line, strict=True), strict=True))
    return lm, settings, {"metrics": metrics.compute(), "predictions": predictions}


def grid_table(grid: list[dict]) -> str:
    rows = ["| weight | bonus | CER |", "|---|---|---|"]
    return "\n".join(
        rows + [f"| {p['weight']:g} | {p['bonus']:g} | {p['cer']:.4f} |" for p in grid]
    )
