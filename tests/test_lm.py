"""The language model of the writer's text: estimated, saved, loaded, and fused in decoding."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hwr.decoding import LMScorer, check_reading, read_batch, token_table
from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.lm import LM_FILE, CharLM, load_lm, read_texts
from hwr.model import load_pretrained

from .conftest import REPO


def poilus_lines() -> list[str]:
    with (REPO / "line_data" / "poilus" / "lines.csv").open(encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def test_held_out_lines_are_likelier_than_the_same_characters_shuffled():
    lines = poilus_lines()
    train, held_out = lines[::2], lines[1::2]
    lm = CharLM.estimate(train, order=6)
    rng = random.Random(0)

    def shuffled(text: str) -> str:
        chars = list(text)
        rng.shuffle(chars)
        return "".join(chars)

    real = sum(lm.logprob(t) for t in held_out)
    mixed = sum(lm.logprob(shuffled(t)) for t in held_out)
    chars = sum(len(t) + 1 for t in held_out)
    assert (real - mixed) / chars > 0.5  # half a nat per character apart, from 15 lines


@pytest.mark.parametrize("context", ["", "\x02", "\x02A la", " pour", "qzxwv", "ment "])
def test_every_next_character_distribution_sums_to_one(context: str):
    lm = CharLM.estimate(poilus_lines(), order=5)
    assert np.exp(lm.dist(context).astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)
    by_query = [lm.logprob_next(c, context) for c in lm.symbols]
    np.testing.assert_allclose(by_query, lm.dist(context), atol=1e-5)


def test_the_model_saves_as_arpa_and_loads_back(tmp_path: Path):
    lm = CharLM.estimate(poilus_lines(), order=4)
    lm.weight, lm.bonus, lm.beams = 0.3, 0.5, 4
    lm.save(tmp_path)
    text = (tmp_path / LM_FILE).read_text(encoding="utf-8")
    assert text.splitlines()[1] == "\\data\\" and "\\4-grams:" in text and "<space>" in text
    loaded = load_lm(str(tmp_path))
    assert (loaded.order, loaded.weight, loaded.bonus, loaded.beams) == (4, 0.3, 0.5, 4)
    for line in ("Paris le 2 Août 1914", "zut alors"):
        assert loaded.logprob(line) == pytest.approx(lm.logprob(line), abs=1e-3)
    assert load_lm(str(tmp_path), 0.7).weight == 0.7
    assert load_lm(str(tmp_path), 0) is None  # model.lm_weight=0: read without it
    assert load_lm(str(tmp_path / "elsewhere")) is None


def test_a_damaged_language_model_is_named(tmp_path: Path):
    CharLM.estimate(["une ligne"], order=2).save(tmp_path)
    (tmp_path / LM_FILE).write_text("\\data\\\nngram 1=2\n\n\\1-grams:\nnot-a-number\ta\n")
    with pytest.raises(UserError, match=f"{LM_FILE}: the language model could not be read"):
        load_lm(str(tmp_path))


def test_missing_text_files_and_an_empty_model_are_named(tmp_path: Path):
    with pytest.raises(UserError, match=r"lm.texts: .*nowhere.txt is not a file"):
        read_texts([str(tmp_path / "nowhere.txt")])
    with pytest.raises(UserError, match="no training lines"):
        CharLM.estimate([], order=6)


def test_fusion_turns_a_near_miss_into_the_word_the_model_knows():
    """Greedy decoding where the decoder prefers 'Pavis' by a little: the language model of
    text that says 'Paris' turns it round."""
    tok = load_pretrained("embedded")[1].tokenizer
    lm = CharLM.estimate(["à Paris", "de Paris à Lyon", "Paris le 2 août"] * 3, order=4)
    size, start = len(tok), tok.eos_token_id
    # The decoder's scores at each step: the right character, except 'v' over 'r' at the third.
    steps = [{"P": 0.0}, {"a": 0.0}, {"v": -0.5, "r": -1.0}, {"i": 0.0}, {"s": 0.0}, {}]

    def decode(scorer: LMScorer | None) -> str:
        ids = [start]
        for step in steps:
            scores = torch.full((1, size), -10.0)
            for char, score in step.items():
                scores[0, tok.convert_tokens_to_ids(char)] = score
            if not step:
                scores[0, tok.eos_token_id] = 0.0
            if scorer is not None:
                scores = scorer(torch.tensor([ids]), scores)
            ids.append(int(scores.argmax()))
        return tok.decode(ids, skip_special_tokens=True)

    assert decode(None) == "Pavis"
    lm.weight = 1.0
    assert decode(LMScorer(lm, tok, size, tok.eos_token_id)) == "Paris"


def test_bpe_tokens_are_scored_by_the_characters_they_write(trocr_miniature: Path):
    """TrOCR's tokens are pieces of words: each is scored character by character, as
    batch_decode joins them."""
    tok = load_pretrained(str(trocr_miniature))[1].tokenizer
    lm = CharLM.estimate(poilus_lines(), order=6)
    lm.weight = 1.0
    size = len(tok)
    text, _, length = token_table(lm, tok, size)
    ids = tok("the key is under the pot", add_special_tokens=False)["input_ids"]
    assert any(len(text[i]) > 1 for i in ids)
    assert "".join(text[i] for i in ids) == lm.encode(tok.decode(ids))
    scorer = LMScorer(lm, tok, size, tok.eos_token_id)
    prefix = [tok.eos_token_id, *ids[:2]]
    scores = torch.zeros(1, size)
    scores[0, ids[2]] = 5.0  # among the candidates
    out = scorer(torch.tensor([prefix]), scores)
    context = "\x02" + "".join(text[i] for i in ids[:2])
    expected = 5.0 + sum(
        lm.logprob_next(c, context + text[ids[2]][:j]) for j, c in enumerate(text[ids[2]])
    )
    assert float(out[0, ids[2]]) == pytest.approx(expected, abs=1e-4)
    assert int(length[ids[2]]) == len(text[ids[2]])


def test_weight_zero_reads_exactly_as_without_it():
    model, processor = load_pretrained("embedded", max_new_tokens=40)
    folder = REPO / "line_data" / "poilus" / "images"
    images = [open_rgb(folder / f"tauzin_{i:02d}.jpg") for i in (1, 2)]
    image = processor(images=images, return_tensors="pt").pixel_values
    lm = CharLM.estimate(["la vie est belle"] * 5, order=6)
    plain, _ = read_batch(model.eval(), processor, image, confidence=False)
    lm.weight = 0.0
    assert read_batch(model, processor, image, confidence=False, lm=lm)[0] == plain
    lm.weight = 5.0  # overwhelming: the reading follows the language model
    fused, _ = read_batch(model, processor, image, num_beams=2, confidence=False, lm=lm)
    assert fused != plain and all(
        lm.logprob(t) > lm.logprob(p) for t, p in zip(fused, plain, strict=True)
    )


def test_a_negative_weight_is_refused_before_the_model_loads():
    with pytest.raises(UserError, match=r"model.lm_weight=-0.5: must be 0 or more"):
        check_reading(1, 8, None, -0.5)
