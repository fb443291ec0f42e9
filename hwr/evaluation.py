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
from hwr.errors import UserError
from hwr.metrics import TextMetrics
from hwr.model import TRAINED_ON, ModelUnavailableError, TrOCRModule
from hwr.report import write_json, write_report

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

    A model folder that records its training lines (train.py's model/) is also scored on
    the other lines alone, as "NAME (unseen)": scores on training lines flatter it.
    """
    if not cfg.models:
        raise UserError("No models to evaluate: add models.NAME=hub-id-or-folder (one or more).")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    lines = datamodule.eval_lines
    make_module = instantiate(cfg.model, _partial_=True)
    results = {}
    for name, name_or_path in cfg.models.items():
        log.info("Reading %d lines with %s (%s)", len(lines), name, name_or_path)
        try:
            module: TrOCRModule = make_module(name_or_path=name_or_path)
        except ModelUnavailableError as e:
            e.setting = f"models.{name}"
            raise
        datamodule.processor = module.processor
        # One TensorBoard run per model, so they sit side by side.
        logger = TensorBoardLogger(
            run_dir / "tensorboard", name=name, version="", default_hp_metric=False
        )
        trainer = instantiate(cfg.trainer, logger=logger, enable_checkpointing=False)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = module.metrics.compute()
        results[name] = {"metrics": metrics, "predictions": dict(module.predictions)}
        logger.log_hyperparams(
            {"model": str(name_or_path)}, {f"hp/{k}": v for k, v in metrics.items()}
        )
        seen = seen_in_training(name_or_path, lines)
        if not seen:
            continue
        apart = ""
        if len(seen) < len(lines):
            results[f"{name} (unseen)"] = unseen_result(results[name], lines, seen)
            apart = (
                f" Its {len(lines) - len(seen)} other lines are scored apart as '{name} (unseen)'."
            )
        log.warning(
            "models.%s was trained on %d of these %d lines: its scores on them are not scores "
            "on unseen handwriting.%s (data.eval_split=val with the split settings of its "
            "training run reads only the held-out side.)",
            name,
            len(seen),
            len(lines),
            apart,
        )

    write_json(run_dir / "metrics.json", {n: r["metrics"] for n, r in results.items()})
    table = write_report(run_dir, lines, results)
    print(table)
    log.info("Written to %s", run_dir)
    return {n: r["metrics"] for n, r in results.items()}
