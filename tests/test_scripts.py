"""train.py and evaluate.py end to end, as a user runs them, and the real configs composing."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import VisionEncoderDecoderModel

from hwr.lm import load_lm
from hwr.model import load_pretrained

from .conftest import REPO

# Reading is cut short for speed; labels keep their length (else they are bad rows).
FAST = [
    "trainer.max_epochs=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.max_new_tokens=24",
    "data.max_target_length=128",
    "lm.weights=[0.3,1.0]",
    "lm.bonuses=[0.0]",
    "lm.tune_lines=12",
]


def run(script: str, *args: str, expect_rc: int = 0) -> str:
    """Run a top-level script like a user; fail with its output if it exits otherwise."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        timeout=600,
    )
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def trained_run(trocr_miniature: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One train.py run of the miniature TrOCR on the shipped sample."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    out = run(
        "train.py", f"model.name_or_path={trocr_miniature}", f"hydra.run.dir={run_dir}", *FAST
    )
    (run_dir.parent / "output.txt").write_text(out)
    return run_dir


def test_a_fresh_run_is_not_warned_about_checkpoints_it_never_asked_for(trained_run: Path):
    out = (trained_run.parent / "output.txt").read_text()
    assert "Seed set to 0" in out  # the output was captured
    assert "ckpt_path" not in out


def test_train_leaves_every_file(trained_run: Path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for which in ("base", "tuned", "tuned + LM"):
        assert set(metrics[which]) == {"cer", "wer", "accuracy", "char_similarity", "n_lines"}
        assert metrics[which]["n_lines"] == 20  # the 50/50 split of 40 lines
    # The language model's weight, chosen on 12 validation lines (0: without it).
    lm = metrics["settings"]["lm"]
    assert [(p["weight"], p["bonus"]) for p in lm["grid"]] == [(0, 0), (0.3, 0), (1.0, 0)]
    assert lm["weight"] == min(lm["grid"], key=lambda p: p["cer"])["weight"]
    assert metrics["settings"]["optim"]["lr"] == 1e-5
    assert metrics["settings"]["n_train"] == 20 and metrics["settings"]["epochs_trained"] == 2

    with (trained_run / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    assert list(rows[0]) == [
        "file_name",
        "reference",
        *("base", "base_cer", "tuned", "tuned_cer", "tuned + LM", "tuned + LM_cer"),
    ]

    for png in ("comparison.png", "examples.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    model = VisionEncoderDecoderModel.from_pretrained(trained_run / "model")
    assert model.generation_config.decoder_start_token_id == 2
    trained_on = json.loads((trained_run / "model" / "trained_on.json").read_text())
    assert len(trained_on["train_images"]) == 20 and trained_on["csv"].endswith("lines.csv")
    # The language model of the 20 training lines' text, saved with the model at its weight.
    saved = load_lm(str(trained_run / "model"), lm["weight"] or 0.5)
    assert saved.lines == 20 and saved.order == 6


def test_tensorboard_curves_start_at_the_base_score(trained_run: Path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    cer = scalars(trained_run / "tensorboard", "val/cer")
    assert cer[0] == (0, pytest.approx(metrics["base"]["cer"], abs=1e-6))
    assert len(cer) >= 3  # base, each epoch, the final best
    assert scalars(trained_run / "tensorboard", "train/loss")
    assert scalars(trained_run / "tensorboard", "lr-AdamW")


def test_resume_from_last_continues_the_run(trained_run: Path, trocr_miniature: Path):
    out = run(
        "train.py",
        f"model.name_or_path={trocr_miniature}",
        f"hydra.run.dir={trained_run}",
        "ckpt_path=last",
        *FAST[1:],
        "trainer.max_epochs=3",
    )
    assert "Resuming from" in out and "last.ckpt" in out
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["settings"]["epochs_trained"] == 3
    assert "base" in metrics  # the base score travels in the checkpoint


def test_evaluate_compares_any_number_of_models(
    trained_run: Path, trocr_miniature: Path, tmp_path: Path
):
    out = run(
        "evaluate.py",
        f"models.base={trocr_miniature}",
        f"models.tuned={trained_run / 'model'}",
        "models.scratch=tiny",
        f"hydra.run.dir={tmp_path}",
        "model.max_new_tokens=24",
        "data.num_workers=0",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The tuned model was trained on 20 of the 40 lines: every model is also scored on the
    # other 20, like for like.
    names = ["base", "tuned", "scratch"]
    assert list(metrics) == names + [f"{n} (unseen)" for n in names]
    assert [m["n_lines"] for m in metrics.values()] == [40, 40, 40, 20, 20, 20]
    assert "models.tuned was trained on 20 of these 40 lines" in out
    assert "Every model is also scored on the 20 lines no model here was trained on" in out
    assert "| tuned |" in out and "| base (unseen) |" in out
    for name in names:
        assert scalars(tmp_path / "tensorboard" / name, "val/cer")
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "examples.png").is_file()
    with (tmp_path / "predictions.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    unseen = {n: {r["file_name"] for r in rows if r[f"{n} (unseen)_cer"] != "nan"} for n in names}
    assert len(unseen["base"]) == 20 and unseen["base"] == unseen["tuned"] == unseen["scratch"]
    trained = json.loads((trained_run / "model" / "trained_on.json").read_text())["train_images"]
    assert not {Path(f).name for f in unseen["tuned"]} & {Path(t).name for t in trained}


def test_multirun_writes_a_summary_that_shows_failed_jobs(tmp_path: Path):
    run(
        "train.py",
        "-m",
        "model=tiny",
        "data.val_fraction=0.5,0.25,1.5",
        f"hydra.sweep.dir={tmp_path}",
        "trainer.max_epochs=1",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.max_new_tokens=16",
        "data.max_target_length=128",
        expect_rc=1,  # Hydra exits 1 when any job failed
    )
    with (tmp_path / "summary.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(o for r in ok for o in r["overrides"].split() if "val_fraction" in o) == [
        "data.val_fraction=0.25",
        "data.val_fraction=0.5",
    ]
    assert float(ok[0]["tuned_cer"]) <= float(ok[1]["tuned_cer"])  # sorted by tuned CER
    assert rows[-1]["status"].startswith("failed") and "val_fraction" in rows[-1]["status"]
    # The tiny model knows languages: told the CSV's, guessed from its words, and saved with it.
    models = sorted(tmp_path.glob("*/model"))
    assert [load_pretrained(str(m))[0].generation_config.language for m in models] == ["en"] * 2
    assert (
        "| tuned_cer" in (tmp_path / "summary.md").read_text()
        or "tuned_cer" in (tmp_path / "summary.md").read_text()
    )


@pytest.mark.parametrize("model", ["trocr_base", "trocr_small", "trocr_large", "embedded", "tiny"])
def test_every_model_option_composes(compose_cfg, model: str):
    cfg = compose_cfg("train", [f"model={model}"])
    assert cfg.model._target_ == "hwr.module.TrOCRModule"
    assert cfg.model.max_new_tokens >= 128


def test_defaults_follow_the_original_recipe(compose_cfg):
    cfg = compose_cfg("train")
    assert cfg.model.name_or_path == "microsoft/trocr-base-handwritten"
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.optim.lr) == (2, 4, 1e-5)
    assert cfg.data.val_fraction == 0.5
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert callbacks[0].monitor == "val/cer" and callbacks[0].mode == "min"


def test_quickstart_experiment_composes(compose_cfg):
    cfg = compose_cfg("train", ["experiment=quickstart"])
    assert cfg.model.name_or_path == "embedded"
    assert cfg.data.csv == "line_data/poilus/lines.csv" and cfg.data.group_by == "page"
    assert cfg.optim.lr == 3e-5 and cfg.data.val_fraction == 0.5


def test_english_quickstart_trains_on_the_pangrams_and_scores_the_prose(compose_cfg):
    cfg = compose_cfg("train", ["experiment=quickstart_en"])
    assert cfg.model.name_or_path == "embedded" and cfg.optim.lr == 3e-5
    dm = instantiate(cfg.data)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.eval_lines)) == (35, 24)
    assert dm.eval_lines[0].text == "his brain he began to"


def test_optuna_search_composes(compose_cfg):
    cfg = compose_cfg("train", ["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "minimize"
    assert set(sweeper.params) == {"optim.lr", "data.batch_size", "trainer.max_epochs"}


def test_evaluate_config_reads_every_line_without_augmentation(compose_cfg):
    cfg = compose_cfg("evaluate", ["+models.base=tiny"])
    assert cfg.data.eval_split == "all" and not cfg.data.augment
