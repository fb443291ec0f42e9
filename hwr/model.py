"""The TrOCR VisionEncoderDecoder: loading it (or a fresh layout), wiring its tokens, saving it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import huggingface_hub
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    TrOCRProcessor,
    VisionEncoderDecoderModel,
)

from hwr.embedded import LAYOUTS, build_embedded, embedded_path
from hwr.embedded.ctc import add_strip_head, ctc_reader, load_strip_head
from hwr.embedded.tiny import build_tiny, language_id
from hwr.errors import UserError
from hwr.lm import CharLM
from hwr.report import umask, write_json

log = logging.getLogger(__name__)


class SavedReader(VisionEncoderDecoderModel):
    """VisionEncoderDecoderModel as hwr loads it, without a load report for what it knows.

    TrOCR's checkpoints were converted without the ViT pooler, which never feeds the
    decoder: it loads random (and frozen, in TrOCRModule). A ViT model's CTC head
    (hwr.embedded.ctc) is no part of the class: `load_pretrained` puts it back. A plain
    transformers install loads what it saves with VisionEncoderDecoderModel, as ever.
    """

    _keys_to_ignore_on_load_missing: ClassVar = [r"^encoder\.pooler\."]
    _keys_to_ignore_on_load_unexpected: ClassVar = [r"^ctc_head\."]


class ModelUnavailableError(UserError, OSError):
    """The model is neither a local folder nor reachable on (or cached from) the hub.

    `setting` is where the user named it (evaluate.py sets `models.NAME`, hwr label
    `--model`), so the offline options are written the way that command takes them.
    """

    def __init__(self, name_or_path: str, reason: str, setting: str = "model.name_or_path"):
        super().__init__(name_or_path, reason)
        self.name_or_path, self.reason, self.setting = name_or_path, reason, setting

    def spell(self, value: str) -> str:
        """`value` as the user's command takes it: model=embedded (a config group in the
        scripts), models.NAME=embedded (evaluate.py), --model embedded (hwr label)."""
        if self.setting.startswith("--"):
            return f"{self.setting} {value}"
        if self.setting == "model.name_or_path" and value in ("embedded", "tiny"):
            return f"model={value}"
        return f"{self.setting}={value}"

    def __str__(self) -> str:
        message = f"{self.spell(self.name_or_path)}: {self.reason}"
        if Path(self.name_or_path).expanduser().exists():
            return message
        return (
            f"{message}\nOffline options:\n"
            f"  {self.spell('embedded')}    the small pre-trained model shipped with hwr\n"
            f"  {self.spell('tiny')}    the built-in tiny model (untrained; for trying the "
            "pipeline)\n"
            f"  {self.spell('/a/folder')}    a model saved with save_pretrained, e.g. a copy of\n"
            "      microsoft/trocr-base-handwritten downloaded on a connected machine\n"
            "  HF_HOME=/path/to/cache HF_HUB_OFFLINE=1    if the hub cache was copied over"
        )


def load_pretrained(
    name_or_path: str, max_new_tokens: int = 128
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """Load model + processor from a hub id, a `save_pretrained` folder or a built-in name:
    `embedded` (the model shipped in hwr/weights) or `tiny` (untrained, built into a temp
    folder); both load from their folder like any other checkpoint."""
    name_or_path = str(name_or_path)
    if name_or_path == "embedded":
        name_or_path = str(embedded_path())
    elif name_or_path == "tiny":
        with tempfile.TemporaryDirectory(prefix="hwr-tiny-") as tmp:
            return load_pretrained(str(build_tiny(Path(tmp))), max_new_tokens)
    local = Path(name_or_path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelUnavailableError(
            name_or_path,
            "not a saved model: it has no config.json. Point at a folder written by "
            "save_pretrained (e.g. the model/ folder of a train.py run).",
        )
    # Out of reach, the hub client retries every file for minutes: look in the cache only.
    cache_only = not local.exists() and not hub_reachable()
    try:
        processor = TrOCRProcessor.from_pretrained(name_or_path, local_files_only=cache_only)
        model = SavedReader.from_pretrained(name_or_path, local_files_only=cache_only)
    except (OSError, ValueError) as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local.exists():
            reason = (
                f"the folder holds a model that could not be loaded ({cause}). It needs what "
                "save_pretrained writes for both the model and the processor: config.json, "
                "model.safetensors (or pytorch_model.bin), the image processor's and the "
                "tokenizer's files. Copy the whole folder again, or save it anew."
            )
        elif cache_only:
            reason = (
                "could not load it: not a local folder, not in the Hugging Face cache, and the "
                "hub is out of reach."
            )
        else:
            reason = (
                f"could not load it: not a local folder, and the hub has no such model ({cause})."
            )
        raise ModelUnavailableError(name_or_path, reason) from e
    if local.exists():
        load_strip_head(model, local)
    wire_token_ids(model, processor, max_new_tokens)
    return model, processor


def warm_start(model: nn.Module, donor: nn.Module, new_tokens: int = 0) -> list[str]:
    """Copy the donor's weights into the model wherever names and shapes match, and a ViT
    strip kernel resized to the new strip (its sum kept, so ink embeds alike): a new layout
    then starts reading where the donor stands. With new_tokens, the model's vocabulary is
    the donor's plus that many tokens at its end: the donor's rows of every vocabulary-sized
    tensor (embeddings, output and CTC heads) are taken, the new rows left fresh. Returns the
    names left fresh (wholly)."""
    own = model.state_dict()
    vocab = model.config.decoder.vocab_size
    taken = {}
    for name, weight in donor.state_dict().items():
        if name not in own:
            continue
        shape = own[name].shape
        if weight.shape == shape:
            taken[name] = weight
        elif name.endswith("patch_embeddings.projection.weight") and weight.shape[:2] == shape[:2]:
            area = weight.shape[2] * weight.shape[3] / (shape[2] * shape[3])
            resized = F.interpolate(weight, size=shape[2:], mode="bilinear", antialias=True)
            taken[name] = resized * area
        elif len(weight) + new_tokens == shape[0] == vocab and weight.shape[1:] == shape[1:]:
            taken[name] = torch.cat([weight, own[name][len(weight) :]])
    model.load_state_dict(taken, strict=False)
    return sorted(own.keys() - taken.keys())


def build_layout(
    layout: str, warm_from: str | None, max_new_tokens: int, seed: int = 0
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """A fresh model of one of the embedded layouts (hwr.embedded.LAYOUTS), with a CTC head
    where its encoder can carry one, warm-started from `warm_from`'s weights where they fit
    (None: from scratch). The decoder must come whole: a donor with another decoder or
    tokenizer would leave it fresh, which is no warm start; a donor whose alphabet the
    embedded one's extends (characters added since) gives all but the new characters' rows."""
    if layout not in LAYOUTS:
        raise UserError(f"model.layout={layout}: choose one of {', '.join(LAYOUTS)} (or null)")
    model, processor = build_embedded(seed, layout)
    if ctc_reader(model) is None and model.config.encoder.model_type == "vit":
        add_strip_head(model)
    wire_token_ids(model, processor, max_new_tokens)
    if warm_from is not None:
        donor, donor_processor = load_pretrained(warm_from, max_new_tokens)
        ids, donor_ids = processor.tokenizer.get_vocab(), donor_processor.tokenizer.get_vocab()
        grown = all(ids.get(token) == i for token, i in donor_ids.items())
        fresh = warm_start(model, donor, len(ids) - len(donor_ids) if grown else 0)
        if any(name.startswith("decoder.") for name in fresh):
            raise UserError(
                f"model.layout={layout} from model.name_or_path={warm_from}: its decoder or "
                f"tokenizer differs from the embedded model's, so {', '.join(fresh)} would "
                "start fresh. Warm-start from an embedded model (model.name_or_path=embedded), "
                "or from scratch (model.name_or_path=null)."
            )
        log.info("model.layout=%s from %s: fresh %s", layout, warm_from, ", ".join(fresh) or "-")
    return model, processor


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (HF_HUB_OFFLINE=1 says it does not)."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def wire_token_ids(
    model: VisionEncoderDecoderModel, processor: TrOCRProcessor, max_new_tokens: int
) -> None:
    """Set the token ids training and generation need, once, from the tokenizer.

    TrOCR was pre-trained to start decoding from `</s>` (id 2), not `<s>`, and to write
    the first character next (labels: `hwr.data.label_ids`). Hub configs leave some of
    these unset, and generation's default of 20 tokens would cut lines short. They also
    say `"use_cache": false` for the decoder, which generation copies: every step would
    re-read the whole line so far (3x slower at TrOCR-base size).
    """
    tok = processor.tokenizer
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
        config.eos_token_id = tok.eos_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = max_new_tokens
    model.config.decoder.use_cache = True
    model.generation_config.use_cache = True


def set_language(model: VisionEncoderDecoderModel, tokenizer, language: str | None) -> None:
    """Tell the model which language it writes (None: it names the one it sees), checked
    against its tokenizer. Kept in its generation config, which `save_pretrained` saves (as
    Whisper keeps its own), so a tuned model reads its writer's language wherever it goes."""
    language_id(tokenizer, language)
    model.generation_config.language = language
    # A config marked as copied from the model's loads back without keys of its own.
    model.generation_config._from_model_config = False


TRAINED_ON = "trained_on.json"


def export(
    model: VisionEncoderDecoderModel,
    processor: TrOCRProcessor,
    out_dir: Path,
    trained_on: dict | None = None,
    lm: CharLM | None = None,
) -> Path:
    """Save model + processor so `from_pretrained` loads them; atomic, never half-written.

    `trained_on` (the CSV and the training images) is kept beside them as trained_on.json,
    so evaluate.py can tell a model's training lines from lines it never saw; the language
    model of the training text `lm` (hwr.lm), if any, as lm.arpa and lm.json.
    """
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if trained_on is not None:
        write_json(tmp / TRAINED_ON, trained_on)
    if lm is not None:
        lm.save(tmp)
    # mkdtemp's folder and the weights file transformers writes are private (0700, 0600):
    # that mode would follow the model wherever it is copied, unreadable to anyone else.
    mask = umask()
    tmp.chmod(0o777 & ~mask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
