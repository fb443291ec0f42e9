"""Nothing silently wrong: odd images and text are read correctly or reported, and every
mistake a user can make ends in one clear message with exit status 2."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from hwr.data import BadRowsError, LineDataset, read_lines, text_checker
from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.model import export, load_pretrained
from hwr.report import write_json
from hwr.settings import bad_settings
from hwr.training import ExceptionCheckpoint, find_checkpoint

from .conftest import REPO
from .test_data import rewrite


def first_image(csv_path: Path) -> Path:
    with csv_path.open(encoding="utf-8", newline="") as f:
        return csv_path.parent / next(csv.DictReader(f))["file_name"]


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.int16)


def test_16_bit_grayscale_is_scaled_not_white(lines_dir: Path):
    path = first_image(lines_dir / "lines.csv")
    original = gray(path)
    Image.fromarray(original.astype(np.uint16) * 257).save(path)  # a 16-bit scan
    assert Image.open(path).mode == "I;16"
    assert np.abs(np.asarray(open_rgb(path).convert("L")) - original).max() <= 1
    lines = read_lines(lines_dir / "lines.csv")  # no longer a blank image to train on
    processor = load_pretrained("tiny")[1]
    pixels = LineDataset(lines, processor)[0]["pixel_values"]
    assert pixels.std() > 0.1


def test_transparent_background_is_white_paper(lines_dir: Path):
    path = first_image(lines_dir / "lines.csv")
    original = gray(path)
    ink = np.zeros((*original.shape, 4), dtype=np.uint8)
    ink[..., 3] = 255 - original  # black ink, as opaque as the line is dark
    Image.fromarray(ink, "RGBA").save(path)
    assert np.abs(np.asarray(open_rgb(path).convert("L")) - original).max() <= 1


@pytest.mark.parametrize(
    ("size", "colour", "reason"),
    [
        ((1, 1), 0, "too small to hold writing (1x1 px"),
        ((10, 300), 0, "not a line: 10x300 px"),
        ((300, 40), 255, "blank"),
    ],
)
def test_images_that_cannot_be_lines_are_bad_rows(lines_dir: Path, size, colour, reason):
    csv_path = lines_dir / "lines.csv"
    Image.new("L", size, colour).save(first_image(csv_path))
    with pytest.raises(BadRowsError) as err:
        read_lines(csv_path)
    assert "line 2:" in str(err.value) and reason in str(err.value)


@pytest.fixture(scope="module")
def embedded_tokenizer():
    return load_pretrained("embedded")[1].tokenizer


def test_text_the_model_cannot_write_is_named(lines_dir: Path, embedded_tokenizer, caplog):
    csv_path = lines_dir / "lines.csv"

    def edit(header, rows):
        rows[0][1] = "Hello 😀 αβγ 漢字"
        rows[1][1] = "a" * 2000

    rewrite(csv_path, edit)
    check = text_checker(embedded_tokenizer, max_tokens=128)
    with pytest.raises(BadRowsError) as err:
        read_lines(csv_path, check_text=check)
    message = str(err.value)
    assert (
        "line 2:" in message and "the character(s) 😀 α β γ 漢 字 (not in its tokenizer)" in message
    )
    # 2,000 letters, the language token before them and </s> after
    assert "line 3:" in message and "2002 tokens, it writes at most 128" in message
    assert "data.allow_unwritable=true" in message

    with caplog.at_level(logging.WARNING):
        lines = read_lines(csv_path, check_text=check, allow_unwritable=True)
    assert len(lines) == 8
    assert "2 line(s) kept with text the model cannot write" in caplog.text


def test_sample_and_real_text_pass_the_check(embedded_tokenizer):
    check = text_checker(embedded_tokenizer, max_tokens=128)
    assert read_lines(REPO / "line_data" / "lines.csv", check_text=check)


def test_one_line_csv_says_what_fixes_it(lines_dir: Path):
    csv_path = lines_dir / "lines.csv"
    rewrite(csv_path, lambda header, rows: rows.__delitem__(slice(1, None)))
    from hwr.data import split_lines

    with pytest.raises(UserError) as err:
        split_lines(read_lines(csv_path), 0.5, 0)
    assert "val_fraction" not in str(err.value).split("):")[1]
    assert "add lines, or give a 'split' column" in str(err.value)


def test_files_follow_the_umask(tmp_path: Path):
    old = os.umask(0o022)
    try:
        assert write_json(tmp_path / "a.json", {}).stat().st_mode & 0o777 == 0o644
        model, processor = load_pretrained("tiny")
        out = export(model, processor, tmp_path / "model", {"csv": "x", "train_images": []})
        assert out.stat().st_mode & 0o777 == 0o755
        assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}
        os.umask(0o077)
        assert write_json(tmp_path / "b.json", {}).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_no_checkpoint_from_a_run_that_never_trained(tmp_path: Path):
    saved = []
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.FITTING), global_step=0, save_checkpoint=saved.append
    )
    callback = ExceptionCheckpoint(tmp_path)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == []
    trainer.global_step = 3
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert saved == [tmp_path / "on_exception.ckpt"]


def test_resume_skips_checkpoints_of_runs_that_never_trained(tmp_path: Path):
    untrained = tmp_path / "outputs" / "train" / "b" / "checkpoints" / "on_exception.ckpt"
    untrained.parent.mkdir(parents=True)
    torch.save({"global_step": 0}, untrained)
    with pytest.raises(UserError, match="no checkpoint of a run that trained"):
        find_checkpoint("last", tmp_path / "new", tmp_path / "outputs")
    trained = tmp_path / "outputs" / "train" / "a" / "checkpoints" / "last.ckpt"
    trained.parent.mkdir(parents=True)
    torch.save({"global_step": 12}, trained)
    os.utime(untrained)  # the untrained one is the newer
    assert find_checkpoint("last", tmp_path / "new", tmp_path / "outputs") == str(trained)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})},
        timeout=300,
    )


def assert_one_message(proc: subprocess.CompletedProcess, *parts: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "\\n" not in out, out[-3000:]
    for part in parts:
        assert part in out, out[-3000:]
    return out


def test_missing_model_is_one_message(tmp_path: Path):
    proc = run("train.py", "model.name_or_path=does/not-exist", f"hydra.run.dir={tmp_path}")
    assert_one_message(proc, "model.name_or_path=does/not-exist: could not load it", "\n  model.")
    assert not (tmp_path / "checkpoints").exists()
    proc = run("evaluate.py", "models.base=does/not-exist", f"hydra.run.dir={tmp_path}")
    assert_one_message(proc, "models.base=does/not-exist", "\n  models.base=embedded ")


def test_unknown_settings_are_named_at_once_with_the_nearest_names(tmp_path: Path):
    proc = run(
        "train.py",
        "trainer.max_epoch=3",
        "optim.lrr=1e-5",
        "model=embeded",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_one_message(
        proc,
        "train.py: 3 bad settings:",
        "trainer.max_epoch: no such setting. Did you mean trainer.max_epochs?",
        "optim.lrr: no such setting. Did you mean optim.lr",
        "model=embeded: no such option. Did you mean embedded?",
    )
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run
    proc = run("-m", "hwr", "predict", "model=embedded", "inputs=x", "segmnt=pages")
    assert_one_message(
        proc,
        "hwr predict: 1 bad setting:\n  segmnt: no such setting. Did you mean segment",
        "Every setting: hwr predict --cfg job",
    )


def test_settings_are_checked_as_each_script_and_group_defines_them():
    assert bad_settings("predict", ["model=embedded", "inputs=x", "segmnt=pages"]) == [
        "segmnt: no such setting. Did you mean segment or segmenter?"
    ]
    # Keys that exist only once a group option (or one of a sweep's) is chosen, hydra's
    # own, additions with +, and sweeps of values are all fine.
    assert not bad_settings(
        "train",
        [
            "model/adapter=lora",
            "model.adapter.r=4",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "experiment=quickstart,learning_curve",
            "data.train_lines=16",
            "+trainer.limit_train_batches=2",
            "optim.lr=1e-5,3e-5",
            "~data.augment.blur",
        ],
    )
    assert bad_settings("evaluate", ["+models.a=tiny", "data.evalsplit=all"]) == [
        "data.evalsplit: no such setting. Did you mean data.eval_split?"
    ]
    assert bad_settings("train", ["trainer=gpus", "trainer.max_epoch=2"]) == [
        "trainer=gpus: no such option. Did you mean gpu? trainer is one of: ddp, default, gpu",
        "trainer.max_epoch: no such setting. Did you mean trainer.max_epochs?",
    ]


def test_help_is_short_and_loads_no_model_library():
    for script in ("train.py", "evaluate.py", "predict.py"):
        code = (
            "import runpy, sys; sys.argv = [sys.argv[1], '--help']; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert 'torch' not in sys.modules, 'torch was imported'"
        )
        proc = run("-c", code, script)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Common settings:" in proc.stdout and len(proc.stdout.splitlines()) < 30
        assert "model=embedded" in proc.stdout


def test_full_error_still_shows_the_traceback(tmp_path: Path):
    proc = run(
        "train.py",
        "model.name_or_path=does/not-exist",
        f"hydra.run.dir={tmp_path}",
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_settings_are_checked_before_the_model_loads(tmp_path: Path):
    # A model that cannot load: had it been loaded first, that would be the error.
    proc = run(
        "train.py",
        "model.name_or_path=does/not-exist",
        "data.batch_size=0",
        f"hydra.run.dir={tmp_path}",
    )
    assert_one_message(proc, "data.batch_size=0: must be a whole number >= 1")
    proc = run("predict.py", "model.name_or_path=does/not-exist", f"hydra.run.dir={tmp_path}")
    assert_one_message(proc, "inputs is missing")
    proc = run(
        "predict.py",
        "model.name_or_path=does/not-exist",
        f"inputs={tmp_path}",
        "model.ctc_weight=1.5",
        f"hydra.run.dir={tmp_path}",
    )
    assert_one_message(proc, "model.ctc_weight=1.5: must be in [0, 1)")


def test_failed_run_leaves_no_checkpoint(sample_copy: Path, tmp_path: Path):
    rewrite(sample_copy, lambda header, rows: rows[3].__setitem__(0, "images/gone.png"))
    run_dir = tmp_path / "run"
    proc = run("train.py", "model=tiny", f"data.csv={sample_copy}", f"hydra.run.dir={run_dir}")
    assert_one_message(proc, "1 bad row(s)", "line 5: images/gone.png: file not found")
    assert not list(run_dir.rglob("*.ckpt"))


def test_predict_skips_and_lists_what_it_cannot_read(tmp_path: Path, trocr_miniature: Path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.open(REPO / "line_data/images/line_00000.png").save(inputs / "a_line.png")
    (inputs / "b_broken.png").write_bytes(b"not a picture")
    Image.new("L", (1, 1), 0).save(inputs / "c_dot.png")
    Image.new("L", (10, 300), 255).save(inputs / "d_sliver.png")  # a "page" with no line
    out = tmp_path / "run"
    proc = run(
        "predict.py",
        f"model.name_or_path={trocr_miniature}",
        f"inputs={inputs}",
        f"hydra.run.dir={out}",
        "model.max_new_tokens=8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "predictions.csv").open(encoding="utf-8") as f:
        assert [Path(r["source"]).name for r in csv.DictReader(f)] == ["a_line.png"]
    with (out / "skipped.csv").open(encoding="utf-8") as f:
        skipped = {Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}
    assert list(skipped) == ["b_broken.png", "c_dot.png", "d_sliver.png"]
    assert skipped["b_broken.png"].startswith("unreadable image")
    assert skipped["c_dot.png"].startswith("too small")
    assert "no line was found" in skipped["d_sliver.png"]
    assert "3 input(s) gave nothing to read" in proc.stdout + proc.stderr
    assert json.loads((out / "predictions.json").read_text())[0]["text"] is not None


def test_an_unreachable_hub_is_not_retried_for_minutes(monkeypatch):
    import huggingface_hub

    from hwr.model import ModelUnavailableError, hub_reachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert not hub_reachable()
    with pytest.raises(ModelUnavailableError, match="not in the Hugging Face cache, and the hub"):
        load_pretrained("someone/not-a-cached-model")
