"""The CTC head: its prefix scores, joint decoding, and its life in saved models and tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import VisionEncoderDecoderModel

from hwr.data import label_ids, read_lines
from hwr.decoding import CTCPrefixScorer, read_batch, read_images
from hwr.embedded.ctc import add_strip_head, ctc_loss
from hwr.embedded.tiny import char_tokenizer
from hwr.model import export, load_pretrained
from hwr.module import TrOCRModule

from .conftest import SAMPLE_CSV

BLANK, EOS, START = 1, 2, 0


@pytest.mark.parametrize("text", [[3, 4, 4, 5], [6], [3, 3, 3], []])
def test_prefix_scores_add_up_to_the_ctc_probability_of_the_line(text: list[int]):
    """Summed over a line's characters and its end, the gains are log p_ctc(line): the
    forward recursion agrees with torch's CTC loss, repeats and the empty line included."""
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 7) * 2
    scorer = CTCPrefixScorer(logits, BLANK, EOS, skip={START}, weight=1.0, candidates=7)
    ids, total = torch.full((2, 1), START), torch.zeros(2)
    for token in [*text, EOS]:
        total += scorer(ids, torch.zeros(2, 7))[:, token]
        ids = torch.cat([ids, torch.full((2, 1), token)], 1)
    logp = logits.log_softmax(-1).transpose(0, 1)
    expected = -F.ctc_loss(
        logp,
        torch.tensor([text, text], dtype=torch.long).reshape(2, len(text)),
        torch.tensor([12, 12]),
        torch.tensor([len(text)] * 2),
        blank=BLANK,
        reduction="none",
    )
    torch.testing.assert_close(total, expected)


def test_joint_decoding_keeps_to_the_picture_where_the_decoder_guesses():
    """The decoder prefers a fluent wrong character at every step; the CTC head sees the
    right ones (3, 5, 4): joined at weight 0.5, greedy reading writes what the head sees."""
    truth, columns = [3, 5, 4], []
    for token in truth:
        columns += [token, BLANK]
    logits = torch.full((1, len(columns), 9), -10.0)
    logits[0, torch.arange(len(columns)), torch.tensor(columns)] = 10.0
    scorer = CTCPrefixScorer(logits, BLANK, EOS, skip={START}, weight=0.5, candidates=4)
    ids = torch.full((1, 1), START)
    for _ in range(6):
        decoder = torch.zeros(1, 9)
        decoder[0, 6] = 3.0  # its favourite, every time
        decoder[0, [*truth, EOS]] = 1.0
        token = scorer(ids, decoder).argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        if token.item() == EOS:
            break
    assert ids[0, 1:].tolist() == [*truth, EOS]
    alone = torch.zeros(1, 9)
    alone[0, 6] = 3.0
    assert alone.argmax().item() == 6  # what the decoder alone would have written


def test_an_unsure_decoder_cannot_write_start_tokens_in_place_of_the_line():
    """<s> adds nothing the head can score: allowed first, then never. The decoder's
    favourite here is <s> at every step (as an unsure decoder's was, up to the token limit,
    on 6 of 458 held-out lines); the reading is still the line the head sees."""
    truth, columns = [3, 5], []
    for token in truth:
        columns += [token, BLANK]
    logits = torch.full((1, len(columns), 9), -10.0)
    logits[0, torch.arange(len(columns)), torch.tensor(columns)] = 10.0
    scorer = CTCPrefixScorer(logits, BLANK, EOS, skip={START}, weight=0.5, candidates=4)
    decoder = torch.zeros(1, 9)
    decoder[0, [*truth, EOS]] = 1.0
    decoder[0, START] = 8.0
    ids = torch.full((1, 1), EOS)  # the decoder's start
    assert scorer(ids, decoder).argmax().item() == START  # first, as some decoders write it
    for _ in range(6):
        ids = torch.cat([ids, scorer(ids, decoder).argmax(-1, keepdim=True)], 1)
        if ids[0, -1].item() == EOS:
            break
    assert ids[0, 1:].tolist() == [START, *truth, EOS]


def test_lines_read_in_order_of_the_heads_reading_come_back_in_their_own_order():
    """read_images decodes a CTC model's lines grouped by the length of the head's reading,
    not in the order given: each text still goes to its image, as read one by one."""
    model, processor = load_pretrained("embedded", max_new_tokens=24)
    model.eval()
    images = [Image.open(line.image).convert("RGB") for line in read_lines(SAMPLE_CSV)[:7]]
    images = images[::-1]  # not in any reading order
    texts, confidences = read_images(model, processor, images, batch_size=3)
    alone = [read_images(model, processor, [image], batch_size=1)[0][0] for image in images]
    assert texts == alone and len(set(texts)) == 7
    assert len(confidences) == 7 and all(0 < c <= 1 for c in confidences)


def _with_head(tmp_path: Path) -> Path:
    """The shipped model with an untrained CTC head over its strips, saved."""
    model, processor = load_pretrained("embedded")
    torch.manual_seed(1)
    torch.nn.init.normal_(add_strip_head(model).weight, std=0.5)
    export(model, processor, tmp_path / "model")
    return tmp_path / "model"


def test_a_saved_ctc_head_comes_back_and_reads_the_same(tmp_path: Path):
    folder = _with_head(tmp_path)
    model, processor = load_pretrained(str(folder), max_new_tokens=8)
    again, _ = load_pretrained(str(folder), max_new_tokens=8)
    torch.testing.assert_close(model.ctc_head.weight, again.ctc_head.weight)
    image = Image.open(read_lines(SAMPLE_CSV)[0].image).convert("RGB")
    pixels = processor(images=[image], return_tensors="pt").pixel_values
    model.eval()
    joint, _ = read_batch(model, processor, pixels, ctc_weight=0.5, confidence=False)
    alone, _ = read_batch(model, processor, pixels, ctc_weight=0, confidence=False)
    assert read_batch(again.eval(), processor, pixels, ctc_weight=0.5)[0] == joint
    assert joint != alone  # the head takes part (untrained, it steers the reading its way)
    # A plain transformers load leaves the head out and loads the rest.
    plain = VisionEncoderDecoderModel.from_pretrained(folder)
    assert not hasattr(plain, "ctc_head")


def test_tuning_trains_the_ctc_head_with_the_decoder(tmp_path: Path):
    """A model with a CTC head tunes on both losses, so the head keeps up with the encoder."""
    module = TrOCRModule(str(_with_head(tmp_path)))
    model = module.plain_model
    pixels = torch.rand(2, 3, 64, 1024)
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    decoder_loss = model(pixel_values=pixels, labels=labels, use_cache=False).loss
    loss = module(pixels, labels)
    assert loss > decoder_loss
    loss.backward()
    assert model.ctc_head.weight.grad.abs().sum() > 0


def test_the_head_is_trained_on_the_characters_not_the_language_token():
    """The head reads the picture; the language is no character in it."""
    tok = char_tokenizer()
    states = torch.randn(1, 12, 5)
    head = torch.nn.Linear(5, len(tok))
    told, plain = (torch.tensor([label_ids(tok, "abba", language=x)]) for x in ("en", None))
    assert told.shape[1] == plain.shape[1] + 1
    assert ctc_loss(head, states, told, tok) == ctc_loss(head, states, plain, tok)


def test_joint_decoding_starts_after_the_language_the_decoder_is_told():
    """Told a language, the decoder's prompt is two tokens (start, language): the head's
    prefixes start empty after them, and the line is still the one the head sees."""
    truth, lang, columns = [3, 5], 8, []
    for token in truth:
        columns += [token, BLANK]
    logits = torch.full((1, len(columns), 9), -10.0)
    logits[0, torch.arange(len(columns)), torch.tensor(columns)] = 10.0
    scorer = CTCPrefixScorer(logits, BLANK, EOS, skip={START, lang}, weight=0.5, prompt=2)
    decoder = torch.zeros(1, 9)
    decoder[0, [*truth, EOS]] = 1.0
    ids = torch.tensor([[EOS, lang]])
    for _ in range(6):
        ids = torch.cat([ids, scorer(ids, decoder).argmax(-1, keepdim=True)], 1)
        if ids[0, -1].item() == EOS:
            break
    assert ids[0, 2:].tolist() == [*truth, EOS]
