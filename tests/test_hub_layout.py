"""The real TrOCR checkpoint's files (hub layout) load and behave as the miniature saved
by today's transformers does: same tokens, same logits, tied output, no pooler noise."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import VisionEncoderDecoderModel
from transformers.utils import logging as hf_logging

from hwr.embedded.synth import SAMPLE_TEXT
from hwr.model import load_pretrained
from hwr.module import TrOCRModule


@pytest.fixture(params=["saved", "hub"])
def layout(request, trocr_miniature: Path, trocr_hub_layout: Path) -> Path:
    return trocr_miniature if request.param == "saved" else trocr_hub_layout


def test_both_layouts_give_the_same_tokens_and_logits(layout: Path, trocr_miniature: Path):
    reference, ref_processor = load_pretrained(str(trocr_miniature))
    model, processor = load_pretrained(str(layout))
    text = SAMPLE_TEXT.splitlines()[:4]
    ids = processor.tokenizer(text).input_ids
    assert ids == ref_processor.tokenizer(text).input_ids
    assert processor.image_processor.size == {"height": 384, "width": 384}

    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([ids[0][:6], ids[1][:6]])
    with torch.no_grad():
        want = reference.eval()(pixel_values=pixels, labels=labels).logits
        got = model.eval()(pixel_values=pixels, labels=labels).logits
    torch.testing.assert_close(got, want)


def test_output_projection_is_tied_after_load_and_reload(layout: Path, tmp_path: Path):
    model, _ = load_pretrained(str(layout))
    decoder = model.decoder
    assert decoder.output_projection.weight is decoder.model.decoder.embed_tokens.weight
    model.save_pretrained(tmp_path)
    again = VisionEncoderDecoderModel.from_pretrained(tmp_path).decoder
    assert again.output_projection.weight is again.model.decoder.embed_tokens.weight


def test_hub_layout_decodes_with_the_cache_and_wired_tokens(trocr_hub_layout: Path):
    model, processor = load_pretrained(str(trocr_hub_layout), max_new_tokens=16)
    assert model.generation_config.use_cache and model.config.decoder.use_cache
    assert model.generation_config.decoder_start_token_id == processor.tokenizer.eos_token_id == 2
    assert model.generation_config.max_new_tokens == 16


def test_missing_pooler_is_frozen_and_not_reported(trocr_hub_layout: Path, caplog):
    hf_logging.enable_propagation()  # transformers' load report, where caplog sees it
    try:
        with caplog.at_level(logging.INFO):
            module = TrOCRModule(str(trocr_hub_layout))
    finally:
        hf_logging.disable_propagation()
    assert "LOAD REPORT" not in caplog.text and "pooler" not in caplog.text
    pooler = module.model.encoder.pooler
    assert pooler is None or not any(p.requires_grad for p in pooler.parameters())
