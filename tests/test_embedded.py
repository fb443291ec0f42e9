"""The synthetic handwriting and the embedded pre-trained model (its layouts, its reading)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import fontpkg
import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont
from PIL import Image

from hwr.data import read_lines
from hwr.decoding import ctc_greedy, read_images
from hwr.embedded import LAYOUTS, WEIGHTS, build_embedded
from hwr.embedded.synth import (
    HELD_OUT_FONTS,
    TRAIN_FONTS,
    TextSource,
    render_line,
    synthetic_lines,
)
from hwr.embedded.tiny import ALPHABET
from hwr.metrics import TextMetrics
from hwr.model import load_pretrained

from .conftest import SAMPLE_CSV
from .test_scripts import run

FONTS = TRAIN_FONTS + HELD_OUT_FONTS


def test_same_seed_same_lines():
    first = [(np.asarray(im), text) for im, text, _ in synthetic_lines(5, seed=3)]
    again = [(np.asarray(im), text) for im, text, _ in synthetic_lines(5, seed=3)]
    other = [text for _, text, _ in synthetic_lines(5, seed=4)]
    assert [t for _, t in first] == [t for _, t in again] != other
    assert all((a == b).all() for (a, _), (b, _) in zip(first, again, strict=True))


@pytest.mark.parametrize("font", FONTS)
def test_every_font_draws_every_character_of_the_alphabet(font: str):
    """A glyph the font lacks would draw a box under a label that names a letter."""
    cmap = TTFont(str(fontpkg.path(font))).getBestCmap()
    assert [c for c in ALPHABET if ord(c) not in cmap] == []
    rng = random.Random(0)
    for chunk in (ALPHABET[i : i + 20] for i in range(0, len(ALPHABET), 20)):
        image = np.asarray(render_line(chunk, font, rng))
        assert image.shape[0] == 64 and image.shape[1] > 10 * len(chunk)
        assert image.max() - image.min() > 60, f"{font} drew no visible ink for {chunk!r}"


def test_text_lines_look_like_notes():
    given = "Une phrase réelle, écrite à la main le 3 mai 2024."
    texts = TextSource({"fr": [given]}, seed=0)
    lines = [texts.line() for _ in range(600)]
    assert all(1 <= len(t) <= 80 for t, _ in lines)
    by_language = {x: [t for t, lang in lines if lang == x] for x in ("fr", "en")}
    assert 250 < len(by_language["fr"]) < 350  # half French, half English
    french, english = "".join(by_language["fr"]), "".join(by_language["en"])
    assert any(c.isdigit() for c in french) and any(c in "éèàç" for c in french)
    assert {"½", "£", "§", "‘", "×"} <= set(english)  # English notes' signs
    assert "«" not in english and "réelle" not in english  # French stays in French lines
    assert len(set(by_language["fr"])) > 100  # half are cut from the one given sentence


def test_embedded_model_reads_the_sample_offline():
    """The shipped sample is in Caveat, a font kept out of pre-training. Measured: CER 0.033
    on its 40 lines (float32); the bound leaves room for other CPUs' arithmetic."""
    model, processor = load_pretrained("embedded")
    assert processor.image_processor.size == {"height": 64, "width": 1024}
    assert (WEIGHTS / "model.safetensors").stat().st_size < 50e6
    lines = read_lines(SAMPLE_CSV)
    texts, confidences = read_images(
        model, processor, [Image.open(line.image).convert("RGB") for line in lines], 8
    )
    metrics = TextMetrics()
    metrics.update(texts, [line.text for line in lines])
    assert metrics.compute()["cer"] < 0.08
    assert min(confidences) > 0.3


def test_predict_reads_in_bf16_with_the_weights_cast(tmp_path: Path):
    """precision=bf16 casts the model (and the pixels) to bfloat16: it reads the sample as
    float32 does, within a few characters."""
    lines = read_lines(SAMPLE_CSV)[:6]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for line in lines:
        Image.open(line.image).save(inputs / line.image.name)
    texts = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        run(
            "predict.py",
            "model=embedded",  # the offline model's one name, as train.py takes it
            f"inputs={inputs}",
            "segment=lines",
            f"precision={precision}",
            f"hydra.run.dir={out}",
        )
        rows = json.loads((out / "predictions.json").read_text())
        texts[precision] = {Path(r["source"]).name: r["text"] for r in rows}
    names = [line.image.name for line in lines]
    metrics = TextMetrics()
    metrics.update([texts["bf16"][n] for n in names], [texts["fp32"][n] for n in names])
    assert metrics.compute()["cer"] < 0.05
    metrics = TextMetrics()
    metrics.update([texts["bf16"][n] for n in names], [line.text for line in lines])
    assert metrics.compute()["cer"] < 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reloads_and_reads_the_same(tmp_path: Path, layout: str):
    """Saved and loaded back through load_pretrained (the custom line encoder by its
    registration on import), a fresh model of each layout writes the same ids."""
    model, processor = build_embedded(layout=layout)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_pretrained(str(tmp_path), max_new_tokens=6)
    image = Image.open(read_lines(SAMPLE_CSV)[0].image).convert("RGB")
    pixels = loaded_processor(images=image, return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels, processor(images=image, return_tensors="pt").pixel_values)
    model.eval()
    with torch.no_grad():
        start = torch.full((1, 1), loaded.config.decoder_start_token_id)
        expected = model(pixel_values=pixels, decoder_input_ids=start).logits
        got = loaded(pixel_values=pixels, decoder_input_ids=start).logits
    torch.testing.assert_close(got, expected)
    assert list(pixels.shape[2:]) == [
        processor.image_processor.size["height"],
        processor.image_processor.size["width"],
    ]
    if layout == "conv64":  # a plain transformers load, after `import hwr.embedded` alone
        load = (
            "import hwr.embedded, sys; from transformers import VisionEncoderDecoderModel as M; "
            "M.from_pretrained(sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", load, str(tmp_path)], check=True)


def test_aspect_kept_layouts_do_not_squash_a_line():
    """A line 4 times wider than another keeps its letters' shape: both are scaled to the
    model's height, and the short one is padded, not stretched."""
    _, processor = build_embedded(layout="conv64")
    short, long = Image.new("RGB", (200, 50), "white"), Image.new("RGB", (800, 50), "white")
    for image in (short, long):
        image.paste((128, 128, 128), (0, 20, 40, 30))  # a grey 40x10 bar (padding is black)
    pixels = processor(images=[short, long], return_tensors="pt").pixel_values[:, 0]
    widths = [int((p.abs() < 0.3).any(0).sum()) for p in pixels]
    assert widths[0] > 20 and abs(widths[0] - widths[1]) <= 2  # the bar is as wide in both


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    ids = torch.tensor([[1, 5, 5, 1, 5, 7, 7, 1]])
    logits = torch.nn.functional.one_hot(ids, 9).float()
    assert ctc_greedy(logits, blank=1) == [[5, 5, 7]]


def test_synth_cli_writes_the_same_lines_with_any_number_of_workers(tmp_path: Path):
    from hwr.embedded.synth import main as synth

    for workers in (1, 2):
        synth(["--out", str(tmp_path / f"w{workers}"), "--lines", "150", "--workers", str(workers)])
    one, two = (read_lines(tmp_path / f"w{w}" / "lines.csv") for w in (1, 2))
    assert [x.text for x in one] == [x.text for x in two] and len(one) == 150
    assert (one[120].image.read_bytes()) == (two[120].image.read_bytes())


def test_get_fonts_keeps_the_latin_regular_face_and_its_licence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--get-fonts unpacks what `npm pack @fontsource/NAME` gives: the Latin subset's
    regular face, its LICENSE and package.json; not the other subsets; a family npm does
    not have is skipped, named."""
    from hwr.embedded.synth import charset, font_files, get_fonts

    package = tmp_path / "package"
    (package / "files").mkdir(parents=True)
    face = fontpkg.path("caveat").read_bytes()
    for name in ("fam-latin-400-normal.woff", "fam-latin-ext-400-normal.woff"):
        (package / "files" / name).write_bytes(face)
    (package / "LICENSE").write_text("SIL Open Font License")
    (package / "package.json").write_text('{"name": "@fontsource/fam", "license": "OFL-1.1"}')
    subprocess.run(["tar", "czf", "fam-5.0.0.tgz", "package"], cwd=tmp_path, check=True)
    npm = tmp_path / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text(
        '#!/bin/sh\n[ "$3" = "@fontsource/fam" ] || { echo "404 $3" >&2; exit 1; }\n'
        f"cp {tmp_path}/fam-5.0.0.tgz . && echo fam-5.0.0.tgz\n"
    )
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{npm.parent}:{os.environ['PATH']}")
    assert get_fonts(tmp_path / "fonts", ["fam", "nope"]) == ["fam"]
    assert sorted(p.name for p in (tmp_path / "fonts" / "fam").iterdir()) == [
        "LICENSE",
        "fam-latin-400-normal.woff",
        "package.json",
    ]
    (font,) = font_files(tmp_path / "fonts")
    assert set(ALPHABET) <= charset(font)
