"""Fine-tuning on few lines: LoRA and freezing train only what they should and export a
plain model; training subsets nest; the learning-curve sweep draws its curve."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from peft import LoraConfig
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from hwr.data import LineDataModule
from hwr.errors import UserError
from hwr.model import export
from hwr.module import TrOCRModule

from .conftest import REPO, SAMPLE_CSV


def fit(module: TrOCRModule, csv_path: Path, steps: int = 6) -> None:
    dm = LineDataModule(str(csv_path), processor=module.processor, batch_size=4)
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)


def changed(module: TrOCRModule, before: dict[str, torch.Tensor]) -> set[str]:
    after = module.model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def snapshot(module: TrOCRModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_lora_trains_only_its_adapters_and_exports_a_plain_model(lines_dir: Path, tmp_path: Path):
    L.seed_everything(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    module = TrOCRModule("tiny", optimizer=partial(torch.optim.AdamW, lr=1e-2), adapter=lora)
    before = snapshot(module)
    fit(module, lines_dir / "lines.csv")
    moved = changed(module, before)
    assert moved and all(".lora_" in k for k in moved)
    assert any("encoder" in k for k in moved) and any("decoder" in k for k in moved)

    images = [Image.open(p).convert("RGB") for p in sorted((lines_dir / "images").iterdir())[:3]]
    pixels = module.processor(images=images, return_tensors="pt").pixel_values
    module.model.eval()
    expected = module.read(pixels)
    out = export(module.merged_model(), module.processor, tmp_path / "model")
    model = VisionEncoderDecoderModel.from_pretrained(out).eval()
    assert not any("lora" in k for k in model.state_dict())
    processor = TrOCRProcessor.from_pretrained(out)
    ids = model.generate(processor(images=images, return_tensors="pt").pixel_values)
    assert [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)] == expected


def test_frozen_parts_stay_as_they_are(lines_dir: Path):
    L.seed_everything(0)
    module = TrOCRModule("tiny", optimizer=partial(torch.optim.AdamW, lr=1e-3), freeze=["encoder"])
    before = snapshot(module)
    fit(module, lines_dir / "lines.csv")
    moved = changed(module, before)
    assert moved and all(k.startswith("decoder.") for k in moved)


def test_freezing_a_part_the_model_lacks_is_named():
    with pytest.raises(UserError, match="no part 'encodr'"):
        TrOCRModule("tiny", freeze=["encodr"])


def test_lora_config_group_builds_a_peft_config(compose_cfg):
    cfg = compose_cfg("train", ["model=embedded", "model/adapter=lora"])
    adapter = instantiate(cfg.model.adapter)
    assert isinstance(adapter, LoraConfig) and set(adapter.target_modules) == {"q_proj", "v_proj"}
    assert compose_cfg("train", ["model=embedded"]).model.adapter is None


def datamodule(**kwargs) -> LineDataModule:
    dm = LineDataModule(str(SAMPLE_CSV), batch_size=4, **kwargs)
    dm.setup()
    return dm


def test_training_subsets_nest_and_leave_validation_alone():
    full = datamodule()
    small, larger = datamodule(train_lines=4), datamodule(train_lines=8)
    other = datamodule(train_lines=4, subset_seed=1)
    assert len(small.splits["train"]) == 4 and len(larger.splits["train"]) == 8
    assert set(small.splits["train"]) < set(larger.splits["train"]) < set(full.splits["train"])
    assert set(small.splits["train"]) != set(other.splits["train"])
    assert small.splits["val"] == full.splits["val"] == other.splits["val"]


def test_a_small_training_set_repeats_up_to_the_epoch_length():
    from hwr.model import load_pretrained

    dm = datamodule(train_lines=4, min_epoch_lines=32, num_workers=0)
    dm.processor = load_pretrained("tiny")[1]
    loader = dm.train_dataloader()
    assert len(loader) == 8  # 32 lines in batches of 4
    seen = [i for batch in loader for i in batch["index"].tolist()]
    assert len(seen) == 32 and sorted(set(seen)) == [0, 1, 2, 3]


def test_learning_curve_sweep_writes_the_curve(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "experiment=learning_curve",
            "model=tiny",
            "data.train_lines=2,4",
            "data.subset_seed=0,1",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "data.min_epoch_lines=8",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.max_new_tokens=8",
            "data.max_target_length=128",
            "lm.weights=[0.5]",
            "lm.bonuses=[0.0]",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "learning_curve.md").read_text()
    assert "| 2 | 2 |" in table and "| 4 | 2 |" in table  # two subset orders each
    # Each size also read with the language model of its training lines' text.
    rows = [row for row in table.splitlines() if row.startswith(("| 2 |", "| 4 |"))]
    assert "tuned + LM CER" in table and all(re.search(r"\| \d\.\d{4} \|$", r) for r in rows)
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"

    def trained_on(job: Path) -> set[str]:
        return set(json.loads((job / "model" / "trained_on.json").read_text())["train_images"])

    jobs = {}
    for job in tmp_path.iterdir():
        if (job / "metrics.json").is_file():
            data = json.loads((job / "metrics.json").read_text())["settings"]["data"]
            jobs[data["train_lines"], data["subset_seed"]] = trained_on(job)
    assert len(jobs) == 4
    assert jobs[2, 0] < jobs[4, 0] and jobs[2, 1] < jobs[4, 1] and jobs[2, 0] != jobs[2, 1]


def test_label_prefills_with_the_newest_model_tuned_on_the_csv(tmp_path: Path):
    import os

    from hwr.pages.label import newest_tuned_model
    from hwr.report import write_json

    csv_path = tmp_path / "lines.csv"
    csv_path.write_text("file_name,text\n")
    outputs = tmp_path / "outputs"
    for run, csv_of_run, mtime in (("a", csv_path, 1), ("b", csv_path, 3), ("c", "x.csv", 5)):
        record = outputs / "train" / run / "model" / "trained_on.json"
        write_json(record, {"csv": str(Path(csv_of_run).resolve()), "train_images": []})
        os.utime(record.parent, (mtime, mtime))
    assert newest_tuned_model(csv_path, outputs) == outputs / "train" / "b" / "model"
    with pytest.raises(UserError, match=r"no model under .* was trained on"):
        newest_tuned_model(tmp_path / "other.csv", outputs)


def test_checkpoint_hyperparameters_load_with_weights_only(tmp_path: Path):
    """Lightning restores best.ckpt with weights_only: Hydra's ListConfig would fail there."""
    from omegaconf import ListConfig

    module = TrOCRModule("tiny", freeze=ListConfig(["encoder"]))
    torch.save(dict(module.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["freeze"] == ["encoder"]
