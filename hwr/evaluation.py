"""Score one or more models on a line CSV, side by side."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from hwr.data import Line
from hwr.machine import trainer_precision
from hwr.metrics import TextMetrics
from hwr.model import TRAINED_ON, ModelUnavailableError
from hwr.module import TrOCRModule
from hwr.report import write_json, write_report
from hwr.training import ShareCores

log = logging.getLogger(__name__)


def seen_in_training(name_or_path: str, lines: list[Line]) -> set[int]:
    """Indices of the lines a tuned model was trained on (from its trained_on.json)."""
    record = Path(str(name_or_path)).expanduser() / TRAINED_ON
    if not record.is_file():
        return set()
    trained = set(json.loads(record.read_text(encoding="utf-8"))["train_images"])
    return {i for i, line in enumerate(lines) if str(line.image) in trained}


def unseen_result(result: dict, lines: list[Line], seen: set[int]) -> dict:
    """A model's scores on the lines it was not trained on only."""
    metrics = TextMetrics()
    unseen = {i: p for i, p in result["predictions"].items() if i not in seen}
    metrics.update([p[0] for p in unseen.values()], [lines[i].text for i in unseen])
    return {"metrics": metrics.compute(), "predictions": unseen}


def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Run the whole job of evaluate.py; returns model name -> metrics.

    The models are `models.NAME=...`, or else the one the model group names (`model=embedded`).
    When a model folder records its training lines (train.py's model/), every model is also
    scored on the lines none of them was trained on, as "NAME (unseen)", side by side:
    scores on training lines flatter the model that saw them.
    """
    models = dict(cfg.models) or {Path(str(cfg.model.name_or_path)).name: cfg.model.name_or_path}
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    lines = datamodule.eval_lines
    make_module = instantiate(cfg.model, _partial_=True)
    precision = trainer_precision(cfg.trainer)
    results, seen = {}, set()
    for name, name_or_path in models.items():
        log.info("Reading %d lines with %s (%s)", len(lines), name, name_or_path)
        try:
            module: TrOCRModule = make_module(name_or_path=name_or_path)
        except ModelUnavailableError as e:
            if cfg.models:
                e.setting = f"models.{name}"
            raise
        datamodule.processor = module.processor
        # One TensorBoard run per model, so they sit side by side.
        logger = TensorBoardLogger(
            run_dir / "tensorboard", name=name, version="", default_hp_metric=False
        )
        trainer = instantiate(
            cfg.trainer,
            precision=precision,
            logger=logger,
            callbacks=[ShareCores()],
            enable_checkpointing=False,
        )
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = module.metrics.compute()
        results[name] = {"metrics": metrics, "predictions": dict(module.predictions)}
        logger.log_hyperparams(
            {"model": str(name_or_path)}, {f"hp/{k}": v for k, v in metrics.items()}
        )
        trained = seen_in_training(name_or_path, lines)
        if trained:
            log.warning(
                "%s was trained on %d of these %d lines: its scores on them are not "
                "scores on unseen handwriting.",
                f"models.{name}" if cfg.models else name,
                len(trained),
                len(lines),
            )
        seen |= trained
    if seen and len(seen) < len(lines):
        log.warning(
            "Every model is also scored on the %d lines no model here was trained on, as "
            "'NAME (unseen)'. (data.eval_split=val with the split settings of the training "
            "run reads only its held-out side.)",
            len(lines) - len(seen),
        )
        for name in models:
            results[f"{name} (unseen)"] = unseen_result(results[name], lines, seen)
    elif seen:
        log.warning("Every line here was a training line of a model: no unseen lines to score.")

    write_json(run_dir / "metrics.json", {n: r["metrics"] for n, r in results.items()})
    table = write_report(run_dir, lines, results)
    print(table)
    log.info("Written to %s", run_dir)
    return {n: r["metrics"] for n, r in results.items()}
