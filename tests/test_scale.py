"""Beyond one process: DDP scores the whole validation set; parallel sweep jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from .test_scripts import run

# Reading is cut short for speed; labels keep their length (else they are bad rows).
SMALL = [
    "data.num_workers=0",
    "model.max_new_tokens=12",
    "data.max_target_length=128",
    "trainer.max_epochs=1",
]


@pytest.fixture(scope="module")
def noisy_model(trocr_miniature: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature with its weights shaken, so each line gets its own (wrong) reading."""
    out = tmp_path_factory.mktemp("noisy")
    model = VisionEncoderDecoderModel.from_pretrained(trocr_miniature)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    TrOCRProcessor.from_pretrained(trocr_miniature).save_pretrained(out)
    return out


def test_ddp_on_two_cpu_processes_scores_the_whole_validation_set(
    noisy_model: Path, tmp_path: Path
):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    run(
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"model.name_or_path={noisy_model}",
        f"hydra.run.dir={ddp}",
        "data.batch_size=4",
        *SMALL,
    )
    run(
        "evaluate.py",
        f"models.base={noisy_model}",
        "data.eval_split=val",
        f"hydra.run.dir={single}",
        *SMALL[:2],
    )
    base = json.loads((ddp / "metrics.json").read_text())["base"]
    alone = json.loads((single / "metrics.json").read_text())["base"]
    assert base["n_lines"] == alone["n_lines"] == 20  # the whole set, not one shard of 10
    for k in ("cer", "wer", "accuracy", "char_similarity"):
        assert base[k] == pytest.approx(alone[k], abs=1e-6), k
    with (ddp / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and all(r["base_cer"] != "nan" for r in rows)
    assert len({r["base"] for r in rows}) > 1  # a real reading per line, gathered from both


def test_joblib_launcher_runs_jobs_in_parallel(tmp_path: Path):
    run(
        "train.py",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=tiny",
        "optim.lr=1e-3,1e-4",
        f"hydra.sweep.dir={tmp_path}",
        "data.batch_size=8",
        *SMALL,
    )
    with (tmp_path / "summary.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    lrs = sorted(o for r in rows for o in r["overrides"].split() if o.startswith("optim.lr"))
    assert lrs == ["optim.lr=0.0001", "optim.lr=0.001"]
