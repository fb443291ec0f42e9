"""Score one or more models on a line CSV, side by side."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from hwr.model import TrOCRModule
from hwr.report import write_json, write_report

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, dict]:
    """Run the whole job of evaluate.py; returns model name -> metrics."""
    if not cfg.models:
        raise ValueError("No models to evaluate: add models.NAME=hub-id-or-folder (one or more).")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    results = {}
    for name, name_or_path in cfg.models.items():
        log.info("Reading %d lines with %s (%s)", len(datamodule.eval_lines), name, name_or_path)
        module: TrOCRModule = instantiate(cfg.model, name_or_path=name_or_path)
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

    write_json(run_dir / "metrics.json", {n: r["metrics"] for n, r in results.items()})
    table = write_report(run_dir, datamodule.eval_lines, results)
    print(table)
    log.info("Written to %s", run_dir)
    return {n: r["metrics"] for n, r in results.items()}
