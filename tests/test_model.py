"""Loading, token wiring, learning, export: the model's path as a real checkpoint takes it."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from hwr.data import LineDataModule, LineDataset, collate, read_lines
from hwr.decoding import read_batch
from hwr.embedded.synth import SAMPLE_TEXT, write_sample
from hwr.embedded.tiny import language_id
from hwr.errors import UserError
from hwr.model import ModelUnavailableError, export, load_pretrained, set_language
from hwr.module import TrOCRModule

from .conftest import SAMPLE_CSV


def test_token_ids_are_wired_from_the_tokenizer(trocr_miniature: Path):
    model, processor = load_pretrained(str(trocr_miniature), max_new_tokens=96)
    tok = processor.tokenizer
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    for config in (model.config, model.generation_config):
        assert config.decoder_start_token_id == 2  # </s>, as TrOCR was pre-trained
        assert config.pad_token_id == 1
        assert config.eos_token_id == 2
    assert model.config.vocab_size == len(tok)
    gen = model.generation_config
    assert gen.max_new_tokens == 96 and gen.max_length is None  # no 20-token cut


def test_generation_is_not_cut_at_20_tokens(trocr_miniature: Path):
    model, processor = load_pretrained(str(trocr_miniature), max_new_tokens=40)
    pixels = processor(images=Image.new("RGB", (300, 40), "white"), return_tensors="pt")
    ids = model.generate(pixels.pixel_values, min_new_tokens=40)
    assert ids.shape[1] == 41  # start token + 40


def test_unreachable_hub_model_names_the_offline_options():
    with pytest.raises(ModelUnavailableError) as err:
        load_pretrained("someone/not-a-cached-model")
    message = str(err.value)
    assert message.startswith("model.name_or_path=someone/not-a-cached-model: could not load")
    assert "\n  model=embedded " in message  # real lines, not a repr's "\\n"
    assert "\n  model=tiny " in message and "\n  model.name_or_path=/a/folder " in message
    err.value.setting = "models.base"  # how evaluate.py names it
    assert "\n  models.base=embedded " in str(err.value) and "model.name" not in str(err.value)
    err.value.setting = "--model"  # how hwr label names it
    assert str(err.value).startswith("--model someone/not-a-cached-model: could not load")
    assert "\n  --model embedded " in str(err.value)


def test_folder_that_is_not_a_model_is_named(tmp_path: Path):
    with pytest.raises(ModelUnavailableError, match=r"no config\.json"):
        load_pretrained(str(tmp_path))


def test_tiny_model_overfits_eight_lines(tmp_path: Path):
    """Proof that labels, loss, token wiring and decoding fit together."""
    csv_path = write_sample(tmp_path, SAMPLE_TEXT.splitlines()[:16])
    L.seed_everything(0)
    module = TrOCRModule(
        "tiny", optimizer=partial(torch.optim.AdamW, lr=3e-3), warmup_ratio=0.0, max_new_tokens=64
    )
    dm = LineDataModule(str(csv_path), processor=module.processor, eval_split="train", batch_size=8)
    trainer = L.Trainer(
        max_steps=800,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10**6,
    )
    trainer.validate(module, datamodule=dm, verbose=False)
    assert module.metrics.compute()["cer"] > 0.9
    trainer.fit(module, datamodule=dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    scores = module.metrics.compute()
    assert scores["n_lines"] == 8
    assert scores["cer"] < 0.05, module.predictions
    # Read in reading order, each line's text is kept under its own index.
    lines = dm.eval_lines
    assert sum(module.predictions[i][0] == lines[i].text for i in range(8)) >= 6
    # Trained as TrOCR was, after the start token </s>, and not told the language: it names
    # the language (the lines' English, guessed from their words), then the first character.
    assert dm.language == "en"
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    ids = module.model.generate(batch["pixel_values"][:2], max_new_tokens=4)
    tok = module.processor.tokenizer
    first = tok.batch_decode(ids[:, 2:3])
    assert ids[:, :2].tolist() == [[2, tok.convert_tokens_to_ids("<en>")]] * 2
    assert first == [t[0] for t in batch["text"][:2]]


@pytest.mark.parametrize("name", ["trocr", "embedded"])
def test_labels_follow_trocr_pretraining(name: str, trocr_miniature: Path):
    """The decoder reads `</s> t1 .. tn` and learns to write `t1 .. tn </s>`, as fairseq
    pre-trained TrOCR (microsoft/unilm trocr/data.py, move_eos_to_beginning=True); the
    tokenizer's `<s> t1 .. tn </s>` would teach every fine-tune to write `<s>` first."""
    model, processor = load_pretrained(str(trocr_miniature) if name == "trocr" else name)
    tok = processor.tokenizer
    dm = LineDataModule(str(SAMPLE_CSV), processor=processor, eval_split="all", batch_size=2)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    labels = batch["labels"]
    text = tok(batch["text"][0], add_special_tokens=False).input_ids
    # The embedded model is told the sample's language first (guessed from its words).
    prompt = [language_id(tok, "en", "model.language")] if name == "embedded" else []
    assert dm.language == ("en" if name == "embedded" else None)
    n = len(prompt) + len(text) + 1
    assert labels[0, :n].tolist() == [*prompt, *text, tok.eos_token_id]
    seen = []
    model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    model(pixel_values=batch["pixel_values"], labels=labels)
    assert seen[0][0, :n].tolist() == [tok.eos_token_id, *prompt, *text]


def test_export_round_trip_reads_the_same(trocr_miniature: Path, tmp_path: Path):
    """What train.py exports loads with plain transformers and reads exactly the same.

    (transformers 5 removed pipeline("image-to-text"); from_pretrained + generate is
    the way to use a VisionEncoderDecoder there.)
    """
    module = TrOCRModule(str(trocr_miniature), max_new_tokens=24)
    with torch.no_grad():  # make the random model's output depend on the image
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    out = export(module.model, module.processor, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}  # readable to all

    images = [
        Image.open(SAMPLE_CSV.parent / f"images/line_{i:05d}.png").convert("RGB") for i in (0, 1)
    ]
    pixels = module.processor(images=images, return_tensors="pt").pixel_values
    module.model.eval()
    expected = module.read(pixels)

    model = VisionEncoderDecoderModel.from_pretrained(out).eval()
    processor = TrOCRProcessor.from_pretrained(out)
    ids = model.generate(processor(images=images, return_tensors="pt").pixel_values)
    got = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert got == expected
    assert model.generation_config.max_new_tokens == 24
    assert model.generation_config.decoder_start_token_id == 2


def test_compiled_encoder_computes_the_same_and_exports_the_same_keys(
    trocr_miniature: Path, tmp_path: Path
):
    plain = TrOCRModule(str(trocr_miniature))
    compiled = TrOCRModule(str(trocr_miniature), compile_encoder=True)
    plain.model.eval()
    compiled.model.eval()
    pixels = torch.randn(2, 3, 384, 384)
    labels = torch.tensor([[0, 5, 6, 2], [0, 7, 2, -100]])
    with torch.no_grad():
        assert compiled(pixels, labels).item() == pytest.approx(
            plain(pixels, labels).item(), rel=1e-4
        )
    out = export(compiled.model, compiled.processor, tmp_path / "model")
    reloaded = VisionEncoderDecoderModel.from_pretrained(out)
    assert set(reloaded.state_dict()) == set(plain.model.state_dict())


def test_generation_uses_the_cache_even_when_the_hub_config_says_not(
    trocr_miniature: Path, tmp_path: Path
):
    """TrOCR's hub configs carry "use_cache": false in the decoder; generation copies it."""
    model = VisionEncoderDecoderModel.from_pretrained(trocr_miniature)
    model.config.decoder.use_cache = False
    model.generation_config.use_cache = False
    model.save_pretrained(tmp_path)
    TrOCRProcessor.from_pretrained(trocr_miniature).save_pretrained(tmp_path)

    model, processor = load_pretrained(str(tmp_path), max_new_tokens=12)
    lengths = []
    model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    pixels = processor(images=Image.new("RGB", (300, 40), "white"), return_tensors="pt")
    model.generate(pixels.pixel_values, min_new_tokens=12)
    assert len(lengths) == 12 and lengths[1:] == [1] * 11  # one new token a step: cached


@pytest.mark.parametrize(
    "missing", ["model.safetensors", "tokenizer.json", "processor_config.json"]
)
def test_a_folder_missing_files_is_named_with_what_to_do(tmp_path: Path, missing: str):
    model, processor = load_pretrained("tiny")
    out = export(model, processor, tmp_path / "model")
    (out / missing).unlink()
    with pytest.raises(ModelUnavailableError) as err:
        load_pretrained(str(out))
    message = str(err.value)
    assert message.startswith(f"model.name_or_path={out}: the folder holds a model that could")
    assert "save_pretrained" in message and "Offline options" not in message


def test_memory_savings_train_the_same(tmp_path: Path):
    """Gradient checkpointing and stepping in backward (TrOCR-base's defaults) save memory,
    not accuracy: after the same steps, the same weights as plain AdamW."""
    csv_path = write_sample(tmp_path, SAMPLE_TEXT.splitlines()[:8])

    def train(**savings: bool) -> tuple[dict, int]:
        L.seed_everything(0)
        module = TrOCRModule(
            "tiny", optimizer=partial(torch.optim.AdamW, lr=1e-3), max_new_tokens=32, **savings
        )
        dm = LineDataModule(str(csv_path), processor=module.processor, batch_size=4)
        trainer = L.Trainer(
            max_steps=3,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        module.check_trainer(trainer)
        start = {k: v.clone() for k, v in module.model.state_dict().items()}
        trainer.fit(module, datamodule=dm)
        after = module.model.state_dict()
        assert not all(torch.equal(start[k], after[k]) for k in start)
        return after, trainer.global_step

    plain, steps = train()
    saving, steps_saving = train(gradient_checkpointing=True, step_in_backward=True)
    assert steps == steps_saving == 3
    for name, weight in plain.items():
        torch.testing.assert_close(saving[name], weight, msg=name)


@pytest.mark.parametrize(
    ("setting", "trainer_args"),
    [
        ("trainer.gradient_clip_val=1.0", {"gradient_clip_val": 1.0}),
        ("trainer.accumulate_grad_batches=4", {"accumulate_grad_batches": 4}),
    ],
)
def test_settings_that_need_every_gradient_are_named(setting: str, trainer_args: dict):
    module = TrOCRModule("tiny", step_in_backward=True)
    with pytest.raises(UserError, match=rf"{setting} .*model\.step_in_backward=false"):
        module.check_trainer(L.Trainer(logger=False, **trainer_args))


def test_the_language_told_reaches_the_decoder_and_is_saved(tmp_path: Path):
    """The same pictures labelled in two languages: told English, the model writes the
    English; told French, the French. What it is told is saved with it."""
    english = ["the black cat", "two red apples"]
    french = {"the black cat": "le chat noir", "two red apples": "deux pommes rouges"}
    lines = read_lines(write_sample(tmp_path / "lines", english))
    both = [replace(x, language="en") for x in lines]
    both += [replace(x, text=french[x.text], language="fr") for x in lines]
    torch.manual_seed(0)
    module = TrOCRModule("tiny", max_new_tokens=32)
    model, processor = module.model, module.processor
    batch = collate([LineDataset(both, processor)[i] for i in range(4)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimizer.zero_grad()
        module(batch["pixel_values"], batch["labels"]).backward()
        optimizer.step()
    model.eval()
    pixels = batch["pixel_values"][:2]
    readings = {}
    for language in ("en", "fr"):
        set_language(model, processor.tokenizer, language)
        readings[language] = read_batch(model, processor, pixels, confidence=False)[0]
    assert readings == {"en": english, "fr": [french[t] for t in english]}
    saved, _ = load_pretrained(str(export(model, processor, tmp_path / "model")))
    assert saved.generation_config.language == "fr"
    saved.eval()
    assert read_batch(saved, processor, pixels, confidence=False)[0] == readings["fr"]


def test_a_language_the_model_cannot_be_told_is_named(trocr_miniature: Path):
    with pytest.raises(UserError, match=r"model.language=de: .* it knows en, fr"):
        TrOCRModule("tiny", language="de")
    with pytest.raises(UserError, match=r"model.language=en: .* no language tokens"):
        TrOCRModule(str(trocr_miniature), language="en")  # TrOCR's tokenizer, as the README says
