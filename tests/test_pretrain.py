"""Pre-training as a train.py run (experiment=pretrain): its stream, corpora, layouts, resume."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import fontpkg
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from hwr.data import CoarseElastic
from hwr.embedded import build_embedded, synth
from hwr.embedded.ctc import add_strip_head
from hwr.embedded.stream import (
    PretrainDataModule,
    corpus_lines,
    is_boilerplate,
    to_alphabet,
    writer_split,
)
from hwr.embedded.synth import TRAIN_FONTS
from hwr.embedded.tiny import ALPHABET, LANGUAGES, char_tokenizer
from hwr.errors import UserError
from hwr.model import build_layout, load_pretrained, warm_start
from hwr.training import trained_steps

from .conftest import REPO, SAMPLE_CSV, SHARED_DATA
from .test_scripts import run, scalars

# A few steps of the real experiment on a small corpus, reading cut short for speed.
QUICK = [
    "experiment=pretrain",
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.num_workers=0",
    "model.max_new_tokens=24",
    "data.max_target_length=128",
    "trainer.val_check_interval=2",
]


def write_corpus(out: Path, rows: range) -> Path:
    """Lines of the shipped sample as a corpus of one writer a line, so that the writer
    split puts some lines on every side."""
    sample = list(csv.DictReader(SAMPLE_CSV.open(encoding="utf-8")))
    out.mkdir()
    with (out / "lines.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["file_name", "text", "writer"])
        writer.writeheader()
        for i in rows:
            name = str(SAMPLE_CSV.parent / sample[i]["file_name"])
            writer.writerow({"file_name": name, "text": sample[i]["text"], "writer": f"w{i}"})
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    sides = [writer_split(f"w{i}") for i in range(40)]
    assert sides.count("val") >= 2 and sides.count("train") >= 20
    return write_corpus(tmp_path / "corpus", range(40))


def corpora(path: Path) -> list[str]:
    """The settings that pre-train on the one corpus at `path`."""
    return ["corpus@data.corpora=[]", f"+data.corpora.sample.path={path}"]


def test_writers_split_the_same_way_everywhere():
    sides = [writer_split(f"copiste-{i:05d}") for i in range(400)]
    assert writer_split("copiste-00220") == writer_split("copiste-00220")
    assert 0.05 < sides.count("test") / 400 < 0.15 and 0.05 < sides.count("val") / 400 < 0.15


def test_pretraining_resumes_after_a_kill_and_saves_a_loadable_model(tmp_path: Path, corpus):
    """Killed (SIGKILL, nothing saved on the way out) after its checkpoint at step 2, the
    run goes on from there with ckpt_path=last, logs the val writers' CER to TensorBoard
    and exports a model that loads, CTC head and all."""
    run_dir = tmp_path / "run"
    args = [*QUICK, *corpora(corpus), f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args, "trainer.max_steps=400"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 300
        while not (last.is_file() and trained_steps(last) >= 2):
            assert proc.poll() is None and time.time() < deadline, "no checkpoint came"
            time.sleep(1)
    except (EOFError, RuntimeError):  # caught mid-write: the next one will do
        time.sleep(2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = trained_steps(last)
    assert 2 <= killed_at < 400
    out = run("train.py", *args, f"trainer.max_steps={killed_at + 2}", "ckpt_path=last")
    assert "Restored all states from the checkpoint" in out
    assert trained_steps(last) == killed_at + 2
    cers = scalars(run_dir / "tensorboard", "val/cer")
    assert cers and cers[-1][0] > killed_at  # the val writers, read after the resume
    model, processor = load_pretrained(str(run_dir / "model"))
    vocab = len(char_tokenizer())
    assert model.config.encoder.patch_size == [64, 8] and len(processor.tokenizer) == vocab
    assert model.ctc_head.weight.shape == (vocab, 256)  # trained with it, saved with it


def test_pretraining_runs_under_ddp_on_two_cpu_processes(tmp_path: Path, corpus):
    run(
        "train.py",
        *QUICK,
        *corpora(corpus),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert trained_steps(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert load_pretrained(str(tmp_path / "model"))[0].ctc_head is not None


def test_exclude_leaves_out_a_document_inside_a_folder_group(tmp_path: Path, compose_cfg):
    """hwr import-xml groups a corpus by folder, and all of Poilus's wills are in one
    (batch-2): the quickstart's will (AN_0200) is left out by its file names."""
    sample = list(csv.DictReader(SAMPLE_CSV.open(encoding="utf-8")))[:6]
    (tmp_path / "poilus").mkdir()
    with (tmp_path / "poilus" / "lines.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["file_name", "text", "folder"])
        writer.writeheader()
        for i, row in enumerate(sample):
            image = tmp_path / "poilus" / f"will_AN_{199 + i % 2:04d}-0_{i:03d}.png"
            image.write_bytes((SAMPLE_CSV.parent / row["file_name"]).read_bytes())
            writer.writerow({"file_name": image.name, "text": row["text"], "folder": "batch-2"})
    poilus = compose_cfg("train", ["experiment=pretrain", "corpus@data.corpora=[poilus]"])
    corpus = {"path": tmp_path / "poilus", "exclude": poilus.data.corpora.poilus.exclude}
    kept = [x for v in corpus_lines("poilus", corpus, set(ALPHABET)).values() for x in v]
    assert sorted(x.file_name for x in kept) == [f"will_AN_0199-0_{i:03d}.png" for i in (0, 2, 4)]


def test_a_missing_corpus_is_named_with_how_to_get_it(tmp_path: Path):
    out = run(
        "train.py",
        *QUICK,
        "corpus@data.corpora=[poilus]",
        f"paths.corpora={tmp_path}",
        f"hydra.run.dir={tmp_path / 'run'}",
        expect_rc=1,
    )
    assert f"data.corpora.poilus: no {tmp_path}/poilus/lines.csv" in out
    assert "git clone https://github.com/HTR-United/CREMMA-AN-TestamentDePoilus" in out


def test_a_new_layout_starts_from_the_shipped_model():
    """model.layout=strips40 from embedded: every shipped weight carries over, the CTC head
    too, the strip kernel resized from 64x8 to 40x5 with its sums kept."""
    model, _ = build_layout("strips40", "embedded", max_new_tokens=24)
    shipped, _ = load_pretrained("embedded")
    kernel = "encoder.embeddings.patch_embeddings.projection.weight"
    weights, donor = model.state_dict(), shipped.state_dict()
    for name, weight in donor.items():
        if name != kernel and "pooler" not in name:
            torch.testing.assert_close(weights[name], weight, msg=name)
    assert weights[kernel].shape[2:] == (40, 5) and donor[kernel].shape[2:] == (64, 8)
    sums = torch.stack([w[kernel].sum(dim=(2, 3)).flatten() for w in (weights, donor)])
    assert torch.corrcoef(sums)[0, 1] > 0.99  # each strip filter responds to ink as before,
    assert 0.9 < sums[0].norm() / sums[1].norm() < 1.1  # and as strongly


def test_tokens_added_since_a_donor_get_fresh_rows_after_its_own():
    """A donor with a shorter vocabulary (weights from before the last characters and the
    language tokens were added) gives every row it has; the new tokens keep the model's."""
    donor, _ = load_pretrained("embedded")
    new = 8
    vocab_sized = [
        donor.decoder.model.decoder.embed_tokens,
        donor.decoder.output_projection,
        donor.ctc_head,
    ]
    for owner in vocab_sized:
        for name, weight in list(owner.named_parameters(recurse=False)):
            setattr(owner, name, torch.nn.Parameter(weight[:-new].clone()))
    model, _ = build_embedded()
    add_strip_head(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert warm_start(model, donor, new_tokens=new) == []
    after, given = model.state_dict(), donor.state_dict()
    for name in ["decoder.output_projection.weight", "ctc_head.weight", "ctc_head.bias"]:
        torch.testing.assert_close(after[name][:-new], given[name], msg=name)
        torch.testing.assert_close(after[name][-new:], before[name][-new:], msg=name)


def test_the_line_encoder_layout_brings_its_own_ctc_head():
    model, _ = build_layout("conv64", "embedded", max_new_tokens=24)
    fresh, _ = build_embedded(layout="conv64")
    assert getattr(model, "ctc_head", None) is None  # none beside its own
    vocab = len(ALPHABET) + 4 + len(LANGUAGES)  # characters, specials, language tokens
    assert model.encoder.ctc_head.weight.shape == (vocab, 256)
    shipped = load_pretrained("embedded")[0].decoder.output_projection.weight
    torch.testing.assert_close(  # the decoder came from the shipped model, not fresh
        model.decoder.output_projection.weight[: len(shipped)], shipped
    )
    assert not torch.equal(
        model.decoder.output_projection.weight, fresh.decoder.output_projection.weight
    )


def test_warm_start_refuses_a_donor_whose_decoder_does_not_fit(trocr_miniature: Path):
    """A BPE TrOCR checkpoint's decoder cannot seed the character decoder: say so, not
    train on with a fresh decoder."""
    with pytest.raises(UserError, match=r"model.layout=strips64 .*decoder or tokenizer differs"):
        build_layout("strips64", str(trocr_miniature), max_new_tokens=24)


def test_coarse_elastic_wobbles_like_torchvisions_elastic():
    """The cheap field moves ink as far, and as smoothly, as torchvision's full-size one."""
    image = Image.new("RGB", (1200, 77), "white")
    torch.manual_seed(0)
    fields = {}
    for warp in (v2.ElasticTransform, CoarseElastic):
        params = warp(alpha=20.0, sigma=4.0).make_params
        dx = torch.cat([params([image])["displacement"][..., 0] for _ in range(20)]) * 600
        assert dx.shape == (20, 77, 1200)
        reach = [(dx[:, :, :-k] * dx[:, :, k:]).mean() / dx.pow(2).mean() for k in (2, 8, 16)]
        fields[warp] = (dx.std(), torch.stack(reach))
    (tv_std, tv_reach), (std, reach) = fields.values()
    assert 0.8 < std / tv_std < 1.2  # measured 0.92: ~0.4 px either way
    torch.testing.assert_close(reach, tv_reach, atol=0.1, rtol=0)  # 0.94, 0.37, 0.01


def stream_texts(dm: PretrainDataModule, n: int) -> list[str]:
    dm.setup()
    return [item["text"] for _, item in zip(range(n), dm.train_dataloader().dataset, strict=False)]


def test_shares_draw_each_corpus_in_its_share(tmp_path: Path):
    """share 1 and 1: a corpus of a few lines comes up as often as one of many."""
    paths = {"big": range(30), "small": range(30, 40)}
    shares = {k: {"path": write_corpus(tmp_path / k, v), "share": 1.0} for k, v in paths.items()}
    dm = PretrainDataModule(shares, build_embedded()[1], real_share=(1.0, 1.0))
    drawn = stream_texts(dm, 400)
    small_texts = {
        line.text for line in dm.splits["train"] if line.group in {f"w{i}" for i in paths["small"]}
    }
    small = sum(text in small_texts for text in drawn)
    by_size = 400 * len(small_texts) / len(dm.splits["train"])
    assert 160 < small < 240 and by_size < 130
    shares["big"]["share"] = None
    with pytest.raises(UserError, match="give every corpus a share, or none"):
        PretrainDataModule(shares, build_embedded()[1]).setup()


def test_every_line_tells_the_decoder_its_language(tmp_path: Path):
    """A corpus's lines are labelled `<its language> ...`; rendered lines are French or English,
    each labelled with its own, and real text of a language is rendered in that language."""
    corpus = {"path": write_corpus(tmp_path / "en", range(40)), "language": "en"}
    dm = PretrainDataModule({"notes": corpus}, build_embedded()[1], real_share=(0.5, 0.5))
    dm.setup()
    tok = dm.processor.tokenizer
    real = {line.text for line in dm.splits["train"]}
    told = Counter()
    for _, item in zip(range(300), dm.train_dataloader().dataset, strict=False):
        language = tok.convert_ids_to_tokens(item["labels"][0].item())
        told[language, "real" if item["text"] in real else "rendered"] += 1
        assert not (item["text"] in real and language == "<fr>"), item["text"]
    assert told["<en>", "real"] > 100
    assert told["<en>", "rendered"] > 20 and told["<fr>", "rendered"] > 20


def test_rendered_lines_grow_with_progress(lines_dir: Path):
    """short_first: rendered lines start at 8 characters and reach 80 as the run goes."""
    dm = PretrainDataModule(
        {"s": {"path": lines_dir}}, build_embedded()[1], real_share=(0, 0), short_first=0.5
    )
    assert isinstance(dm.progress, type(multiprocessing.Value("d", 0.0)))
    assert max(map(len, stream_texts(dm, 40))) <= 8
    dm.progress.value = 0.5
    assert max(map(len, stream_texts(dm, 40))) > 30


def test_rendered_lines_use_the_fonts_folder_where_a_font_has_every_character(
    lines_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """data.fonts adds font files to the installed ones; a text goes to a font that draws all
    of it (a Latin-only font never gets 'œ'), and an empty folder says how to fill it."""
    folder = tmp_path / "fonts" / "family"
    folder.mkdir(parents=True)
    latin = folder / "latin-400-normal.ttf"
    latin.write_bytes(fontpkg.path("caveat").read_bytes())
    monkeypatch.setattr(
        synth,
        "charset",
        lambda font: set(ALPHABET) - {"œ"} if font == str(latin) else set(ALPHABET),
    )
    dm = PretrainDataModule(
        {"s": {"path": lines_dir}}, build_embedded()[1], fonts=str(tmp_path / "fonts")
    )
    assert dm.fonts == [*TRAIN_FONTS, str(latin)]
    rng = random.Random(0)
    drawn = Counter(synth.font_for("un cœur", dm.fonts, rng) for _ in range(300))
    assert str(latin) not in drawn and len(drawn) == len(TRAIN_FONTS)
    drawn = Counter(synth.font_for("a heart", dm.fonts, rng) for _ in range(300))
    assert 10 < drawn[str(latin)] < 60  # about 1 in 11
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--get-fonts"):
        PretrainDataModule(
            {"s": {"path": lines_dir}}, build_embedded()[1], fonts=tmp_path / "empty"
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mʳ le Curé¬", "Mr le Curé-"),
        ("e\u0301te\u0301 ici", "été ici"),
        ("deux\xa0mots", "deux mots"),
        ("⟦effacé⟧ mot", None),
        ("λόγος", None),
    ],
)
def test_transcriptions_are_brought_to_the_alphabet_or_left_out(text: str, expected):
    assert to_alphabet(text, set(ALPHABET)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Nom de référence : imp_wikitexte_0093",
        "IMP_WIKITEXTE_0101",
        "comprends que mon manuscrit sera anonymisé et utilisé pa",
        "et partagé sous license CC-BY pour être utilisé",
        "qu'il pourra aussi être publié et partagé sous",
        "non commerciales.",
    ],
)
def test_copiste_page_furniture_is_boilerplate(text: str):
    assert is_boilerplate(text)


@pytest.mark.parametrize(
    "text",
    [
        "Elle détient une participation",
        "Le township est baptisé en référence à la communauté de",
        "et dirigeant de banque français.",
        "Meeting with Anna on Tuesday at 10:30, room 4B.",
        "de la ville",
    ],
)
def test_ordinary_lines_are_not_boilerplate(text: str):
    assert not is_boilerplate(text)


@pytest.mark.skipif(not (SHARED_DATA / "copiste").is_dir(), reason="../shared/data is absent")
def test_pretraining_leaves_copiste_boilerplate_out():
    sides = corpus_lines("copiste", {"path": SHARED_DATA / "copiste"}, set(ALPHABET))
    kept = [line for lines in sides.values() for line in lines]
    assert len(kept) == 5027 - 619 - 92  # measured: 619 such lines, 92 with letters like ñ or ó
    assert not any("BAnQ" in x.text or "wikitexte" in x.text.lower() for x in kept)
    assert (len(sides["val"]), len(sides["test"])) == (448, 451)  # the model card's writers


def test_the_gpu_recipe_draws_english_as_much_as_french_in_every_font(compose_cfg):
    """experiment=pretrain_gpu: every corpus of the model card, UNIPEN's share equal to the
    French corpora's together, rendered lines in the fetched fonts too; each corpus says
    where it comes from, under which licence, and how to get it."""
    cfg = compose_cfg("train", ["experiment=pretrain_gpu"])
    corpora = cfg.data.corpora
    french = sum(c.share for name, c in corpora.items() if name != "unipen")
    assert corpora.unipen.share == pytest.approx(french) == pytest.approx(1.0)
    assert all(c.licence and c.source and c["get"] for c in corpora.values())
    assert "import-unipen" in corpora.unipen["get"] and cfg.data.fonts == cfg.paths.fonts


def test_evaluate_scores_a_corpus_held_out_writers(tmp_path: Path, corpus):
    """The model card's measure: evaluate.py data=pretrain data.eval_split=test reads the
    writers the split keeps out (evaluate.py has no seed of its own: the stream's default)."""
    out = tmp_path / "eval"
    run(
        "evaluate.py",
        "data=pretrain",
        "data.eval_split=test",
        *corpora(corpus),
        "models.shipped=embedded",
        "model.max_new_tokens=24",
        f"hydra.run.dir={out}",
    )
    held_out = [i for i in range(40) if writer_split(f"w{i}") == "test"]
    assert json.loads((out / "metrics.json").read_text())["shipped"]["n_lines"] == len(held_out)
