"""The CTC head: a character score per column of the encoder, trained beside the decoder.

The decoder writes likely French where it cannot read (a word of another corpus, a name it
knows); the CTC head reads each column for itself, so it keeps to the picture but spells
worse, and reading uses both (`hwr.decoding`). The head is the line encoder's own
(`hwr.embedded.encoder`), or for a ViT a `StripHead` over its strips, saved in the model's
weights as `ctc_head.*`: a plain transformers load leaves it out (and says so), hwr's
`load_pretrained` puts it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import VisionEncoderDecoderModel


class StripHead(nn.Linear):
    """A CTC head over a ViT's strips (its CLS token dropped), one character score per strip."""

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        return super().forward(encoder_states[:, 1:])


def ctc_reader(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's CTC head as a function of the encoder's states, or None if it has none."""
    if getattr(model.encoder, "ctc_head", None) is not None:
        return model.encoder.ctc_logits
    return getattr(model, "ctc_head", None)


def add_strip_head(model: VisionEncoderDecoderModel) -> StripHead:
    """A fresh StripHead on a ViT model (model.ctc_head), trained and saved with it."""
    model.ctc_head = StripHead(model.config.encoder.hidden_size, model.config.decoder.vocab_size)
    return model.ctc_head


def load_strip_head(model: VisionEncoderDecoderModel, folder: Path) -> None:
    """Put back the StripHead a saved model's weights hold (`from_pretrained` leaves out
    what its class does not know); nothing if they hold none."""
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    head = {}
    for name in files:
        if (folder / name).is_file():
            with safe_open(folder / name, "pt") as f:
                names = [k for k in f.keys() if k.startswith("ctc_head.")]  # noqa: SIM118
                head |= {k.removeprefix("ctc_head."): f.get_tensor(k) for k in names}
    if head:
        add_strip_head(model).load_state_dict(head)


def ctc_loss(
    head: Callable[[torch.Tensor], torch.Tensor],
    encoder_states: torch.Tensor,
    labels: torch.Tensor,
    tok,
) -> torch.Tensor:
    """CTC over the encoder's columns against each line's characters (blank = pad; the
    special tokens, a language's among them, are no characters)."""
    logp = head(encoder_states).float().log_softmax(-1).transpose(0, 1)
    special = torch.tensor(tok.all_special_ids, device=labels.device)
    keep = (labels >= 0) & ~torch.isin(labels, special)
    return F.ctc_loss(
        logp,
        labels[keep],
        input_lengths=torch.full((labels.shape[0],), logp.shape[0], dtype=torch.long),
        target_lengths=keep.sum(1),
        blank=tok.pad_token_id,
        zero_infinity=True,
    )
