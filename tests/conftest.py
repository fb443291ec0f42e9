"""Shared fixtures: a miniature of the real TrOCR checkpoint, small line sets, the configs."""

from __future__ import annotations

import os

# Never reach for the network, in this process or in the scripts tests start. Set before
# huggingface_hub is imported: it reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from transformers import GenerationConfig

from hwr.embedded.synth import SAMPLE_TEXT, write_sample
from hwr.embedded.tiny import TROCR_BASE, bpe_tokenizer, save_hub_layout, trocr_layout

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CSV = REPO / "line_data" / "lines.csv"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def trocr_miniature(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """microsoft/trocr-base-handwritten's layout at tiny sizes, saved like the hub checkpoint.

    Byte-level BPE tokenizer with RoBERTa's ids (<s>=0, <pad>=1, </s>=2), a ViT image
    processor at 384x384, the same config keys; and the hub's traps left in: a top-level
    decoder start of <s> and generation's 20-token default.
    """
    out = tmp_path_factory.mktemp("trocr-miniature")
    encoder = {
        **TROCR_BASE["encoder"],
        "patch_size": 32,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    decoder = {
        **TROCR_BASE["decoder"],
        "d_model": 32,
        "decoder_layers": 1,
        "decoder_attention_heads": 2,
        "decoder_ffn_dim": 64,
        "cross_attention_hidden_size": 32,
    }
    del decoder["vocab_size"]  # the tokenizer's
    model, processor = trocr_layout(
        bpe_tokenizer(SAMPLE_TEXT.splitlines()), encoder, decoder, image_size=(384, 384)
    )
    model.config.decoder_start_token_id = 0
    model.generation_config = GenerationConfig(decoder_start_token_id=0, max_length=20)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def trocr_hub_layout(trocr_miniature: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The miniature in the files microsoft/trocr-base-handwritten has on the hub."""
    return save_hub_layout(trocr_miniature, tmp_path_factory.mktemp("trocr-hub-layout"))


@pytest.fixture
def lines_dir(tmp_path: Path) -> Path:
    """Eight rendered lines on two pages, in a fresh folder the test may break."""
    write_sample(tmp_path / "lines", SAMPLE_TEXT.splitlines()[:8], lines_per_page=4)
    return tmp_path / "lines"


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """The shipped sample, copied so the test may change it."""
    return Path(shutil.copytree(SAMPLE_CSV.parent, tmp_path / "line_data")) / "lines.csv"


@pytest.fixture
def compose_cfg():
    """Compose the project's real configs with overrides, as train.py would."""

    def _compose(config_name: str = "train", overrides: list[str] | None = None):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            cfg = compose(config_name, overrides=overrides or [], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} paths resolve, as in a run
        return cfg

    return _compose
