"""The line CSV: every bad-row kind is named, splits are deterministic and grouped,
augmentation touches training images only, labels are padded with -100."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torchvision.transforms import v2
from transformers import TrOCRProcessor

from hwr.data import (
    BadRowsError,
    LineDataModule,
    collate,
    guess_language,
    label_ids,
    read_lines,
    split_lines,
)
from hwr.embedded.tiny import char_tokenizer

from .conftest import SAMPLE_CSV, SHARED_DATA


def rewrite(csv_path: Path, edit) -> None:
    """Apply edit(header, rows) to the CSV (lists of strings, changed in place)."""
    with csv_path.open(encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f))
    edit(header, rows)
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_shipped_sample_reads_clean():
    lines = read_lines(SAMPLE_CSV, group_by="page")
    assert len(lines) == 40
    assert all(line.image.is_file() and line.text and line.group for line in lines)
    assert lines[0].row == 2  # the header is line 1


def break_missing(d: Path, header, rows):
    (d / rows[2][0]).unlink()


def break_truncated(d: Path, header, rows):
    path = d / rows[2][0]
    path.write_bytes(path.read_bytes()[:300])


def break_not_image(d: Path, header, rows):
    (d / rows[2][0]).write_text("not a picture")


def break_empty_text(d: Path, header, rows):
    rows[2][1] = "   "


def break_duplicate(d: Path, header, rows):
    rows[2][0] = rows[0][0]


def break_escape(d: Path, header, rows):
    rows[2][0] = "../outside.png"


def break_split(d: Path, header, rows):
    header.append("split")
    for row in rows:
        row.append("")
    rows[2][-1] = "holdout"


BREAKS = {
    break_missing: "file not found",
    break_truncated: "unreadable image",
    break_not_image: "unreadable image",
    break_empty_text: "empty text",
    break_duplicate: "same image as line 2",
    break_escape: "leaves the data folder",
    break_split: "split 'holdout'",
}


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__)
def test_each_bad_row_is_named_with_line_file_and_reason(lines_dir: Path, breaker):
    csv_path = lines_dir / "lines.csv"
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    file_name = rows[2][0]
    rewrite(csv_path, lambda header, rows: breaker(lines_dir, header, rows))
    with pytest.raises(BadRowsError) as err:
        read_lines(csv_path)
    message = str(err.value)
    assert "line 4:" in message  # third data row
    assert BREAKS[breaker] in message
    if breaker not in (break_duplicate, break_escape):
        assert file_name in message
    assert "data.skip_bad_rows=true" in message
    assert len(err.value.bad) == 1


def test_bad_encoding_is_named(lines_dir: Path):
    csv_path = lines_dir / "lines.csv"
    data = csv_path.read_bytes().split(b"\n")
    data[3] = data[3].replace(b",", "caf\u00e9 ".encode("latin-1") + b",", 1)  # not UTF-8
    csv_path.write_bytes(b"\n".join(data))
    with pytest.raises(BadRowsError, match=r"line 4: .*not valid UTF-8"):
        read_lines(csv_path)


def test_skip_bad_rows_keeps_the_rest_and_says_why(lines_dir: Path, caplog):
    csv_path = lines_dir / "lines.csv"

    def edit(header, rows):
        rows[1] = [rows[1][0], "", rows[1][2]]
        rows.insert(2, ["nope.png", "x", "p"])

    rewrite(csv_path, edit)
    with caplog.at_level(logging.WARNING):
        lines = read_lines(csv_path, skip_bad_rows=True)
    assert len(lines) == 7
    assert "skipped 2 bad row(s)" in caplog.text
    assert "empty text" in caplog.text and "file not found" in caplog.text


def test_missing_column_names_the_setting(lines_dir: Path):
    with pytest.raises(ValueError, match=r"no column 'transcript'.*data.text_column"):
        read_lines(lines_dir / "lines.csv", text_column="transcript")


def test_split_is_deterministic_and_keeps_pages_whole():
    lines = read_lines(SAMPLE_CSV, group_by="page")
    a = split_lines(lines, 0.5, seed=0)
    b = split_lines(lines, 0.5, seed=0)
    c = split_lines(lines, 0.5, seed=1)
    assert [x.row for x in a["val"]] == [x.row for x in b["val"]]
    assert {x.row for x in a["val"]} != {x.row for x in c["val"]}
    assert {x.group for x in a["train"]}.isdisjoint({x.group for x in a["val"]})
    assert len(a["train"]) + len(a["val"]) == len(lines)


def test_ungrouped_split_follows_the_fraction():
    lines = read_lines(SAMPLE_CSV)
    parts = split_lines(lines, 0.25, seed=0)
    assert (len(parts["train"]), len(parts["val"])) == (30, 10)


def test_explicit_split_column_wins(lines_dir: Path):
    csv_path = lines_dir / "lines.csv"

    def edit(header, rows):
        header.append("split")
        for row, mark in zip(rows, ["train"] * 5 + ["val", "val", "test"], strict=True):
            row.append(mark)

    rewrite(csv_path, edit)
    parts = split_lines(read_lines(csv_path), 0.5, seed=0)
    assert [x.row for x in parts["val"]] == [7, 8]
    assert [x.row for x in parts["test"]] == [9]
    assert len(parts["train"]) == 5


def test_two_pages_split_one_each_side(lines_dir: Path):
    """Whichever page is drawn first for validation, the other one trains (greedy filling
    up to the fraction once sent both to validation)."""
    lines = read_lines(lines_dir / "lines.csv", group_by="page")
    for seed in range(4):
        parts = split_lines(lines[:7], 0.5, seed=seed)  # pages of 4 and 3 lines
        assert {len(parts["train"]), len(parts["val"])} == {3, 4}


def test_split_that_leaves_a_side_empty_says_how_to_fix(lines_dir: Path):
    lines = read_lines(lines_dir / "lines.csv", group_by="page")[:4]  # a single page
    with pytest.raises(ValueError, match="split is empty"):
        split_lines(lines, 0.5, seed=0)


def test_recipe_augmentations_from_config(compose_cfg):
    cfg = compose_cfg("train")
    augment = instantiate(cfg.data.augment)
    rotate, jitter, blur = augment["rotate"], augment["jitter"], augment["blur"]
    assert isinstance(rotate, v2.RandomRotation) and list(rotate.degrees) == [-2.0, 2.0]
    assert rotate.fill == 255  # white, like paper
    assert jitter.brightness == (0.9, 1.1) and jitter.contrast == (0.95, 1.05)
    assert blur.p == 0.2
    (gauss,) = blur.transforms
    assert list(gauss.kernel_size) == [3, 3] and list(gauss.sigma) == [0.1, 0.5]
    assert compose_cfg("train", ["data/augment=none"]).data.augment in (None, {})
    assert "blur" not in compose_cfg("train", ["~data.augment.blur"]).data.augment


@pytest.mark.parametrize("augment", ["recipe", "pretrain"])
def test_augmentations_name_interpolation_as_torchvision_enum(compose_cfg, augment):
    """torchvision 0.26 (a GPU machine's) refuses 'bilinear' as a string, in the worker."""
    cfg = compose_cfg("train", [f"data/augment={augment}"])
    given = [n for n, node in cfg.data.augment.items() if node and "interpolation" in node]
    assert given, f"{augment}: no transform names an interpolation"
    built = instantiate(cfg.data.augment)
    for name in given:
        assert isinstance(built[name].interpolation, v2.InterpolationMode), f"{augment}.{name}"


def test_augmentation_touches_training_images_only(compose_cfg, trocr_miniature: Path):
    cfg = compose_cfg("train", [f"data.csv={SAMPLE_CSV}", "data.augment.blur.p=1.0"])
    processor = TrOCRProcessor.from_pretrained(trocr_miniature)
    dm: LineDataModule = instantiate(cfg.data, processor=processor, num_workers=0)
    dm.setup()
    train, val = dm.train_dataloader().dataset, dm.val_dataloader().dataset
    assert train.transform is not None and val.transform is None
    torch.manual_seed(0)
    assert not torch.equal(train[0]["pixel_values"], train[0]["pixel_values"])
    assert torch.equal(val[0]["pixel_values"], val[0]["pixel_values"])
    assert val[0]["pixel_values"].shape == (3, 384, 384)  # the processor's size


def test_labels_are_padded_with_minus_100(trocr_miniature: Path):
    processor = TrOCRProcessor.from_pretrained(trocr_miniature)
    dm = LineDataModule(str(SAMPLE_CSV), processor=processor, eval_split="all")
    dm.setup()
    batch = collate([dm.val_dataloader().dataset[i] for i in (0, 8)])
    labels = batch["labels"]
    lengths = [
        len(processor.tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in batch["text"]
    ]
    assert labels.shape == (2, max(lengths))
    short = lengths.index(min(lengths))
    assert (labels[short, min(lengths) :] == -100).all()
    assert labels[short, min(lengths) - 1] == processor.tokenizer.eos_token_id
    assert batch["pixel_values"].shape == (2, 3, 384, 384)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the project")
@pytest.mark.parametrize(("name", "group"), [("copiste", "writer"), ("peraire", "page")])
def test_real_line_sets_load_as_they_are(name: str, group: str):
    lines = read_lines(SHARED_DATA / name / "lines.csv", group_by=group)
    parts = split_lines(lines, 0.2, seed=0)
    assert {x.group for x in parts["train"]}.isdisjoint({x.group for x in parts["val"]})
    assert 0.15 < len(parts["val"]) / len(lines) < 0.25


def test_validation_reads_lines_of_a_shape_together(trocr_miniature: Path):
    """Like predict, validation and evaluate.py batch lines by width-to-height (a batch
    waits for its longest line), and each item keeps its line's index."""
    processor = TrOCRProcessor.from_pretrained(trocr_miniature)
    dm = LineDataModule(str(SAMPLE_CSV), processor=processor, eval_split="all", eval_batch_size=8)
    dm.setup()
    lines = dm.eval_lines
    served = [i for batch in dm.val_dataloader() for i in batch["index"].tolist()]
    assert sorted(served) == list(range(len(lines)))
    aspects = [lines[i].size[0] / lines[i].size[1] for i in served]
    assert aspects == sorted(aspects) and aspects != [w / h for w, h in (x.size for x in lines)]
    first = dm.val_dataloader().dataset[0]
    assert first["text"] == lines[first["index"]].text


@pytest.mark.parametrize(
    ("texts", "language"),
    [
        (["Meeting with Anna on Tuesday", "the key is under the blue pot"], "en"),
        (["Il faut réparer la fenêtre de la cuisine", "Acheter du pain"], "fr"),
        (["12/05/1914", "Anna, Paul"], None),  # no common word of either
    ],
)
def test_the_lines_language_is_guessed_from_their_words(texts: list[str], language: str | None):
    assert guess_language(texts) == language


def test_labels_name_the_language_first_and_keep_their_end():
    tok = char_tokenizer()
    en, fr = tok.convert_tokens_to_ids("<en>"), tok.convert_tokens_to_ids("<fr>")
    assert label_ids(tok, "ab", language="en") == [
        en,
        *tok("ab", add_special_tokens=False).input_ids,
        2,
    ]
    assert label_ids(tok, "abcdef", max_length=4, language="fr")[::3] == [fr, 2]
    assert len(label_ids(tok, "abcdef", max_length=4, language="fr")) == 4
    assert label_ids(tok, "ab")[0] != en  # no language: as TrOCR was trained
