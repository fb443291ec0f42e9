"""Reading with the CTC head: its best path alone, or joined with the decoder's beam search.

The decoder writes likely French where it cannot read (a word of another corpus, a name it
knows); the CTC head reads each column for itself, so it keeps to the picture but spells
worse. The head is the line encoder's own (`hwr.embedded.encoder`), or for a ViT a
`StripHead` over its strips, saved in the model's weights as `ctc_head.*`: a plain
transformers load leaves it out (and says so), hwr's `load_pretrained` puts it back.

Joint decoding (Watanabe et al. 2017, as speech recognisers decode) scores every
candidate character by both: (1 - w) x the decoder's log-probability + w x how much the
CTC probability of the prefix changes when the character is added (Graves' prefix
probability, computed by the forward recursion over the columns). A hypothesis the
picture does not hold then loses, however fluent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import LogitsProcessor, VisionEncoderDecoderModel

NEG = -1e30  # log 0, finite so that sums of it stay comparable
# The CTC head's share in joint decoding, unless told otherwise (model.ctc_weight): measured
# on held-out writers (model card).
JOINT_WEIGHT = 0.5


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
    """CTC over the encoder's columns against each line's characters (blank = pad)."""
    logp = head(encoder_states).float().log_softmax(-1).transpose(0, 1)
    keep = (labels >= 0) & (labels != tok.bos_token_id) & (labels != tok.eos_token_id)
    return F.ctc_loss(
        logp,
        labels[keep],
        input_lengths=torch.full((labels.shape[0],), logp.shape[0], dtype=torch.long),
        target_lengths=keep.sum(1),
        blank=tok.pad_token_id,
        zero_infinity=True,
    )


def ctc_greedy(logits: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path: the top id per column, repeats merged, blanks dropped."""
    best = logits.argmax(-1)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return [row[k].tolist() for row, k in zip(best, keep, strict=True)]


class CTCPrefixScorer(LogitsProcessor):
    """Joint CTC/attention scores for `generate` (greedy or beam search).

    `ctc_logits` (batch, columns, vocab) are the CTC head's scores for the batch being read,
    `blank` its blank id (the tokenizer's pad), `eos` the decoder's end id, `skip` ids that
    add nothing to the CTC prefix (<s>, which some decoders write first): allowed as the
    first token only, as the head cannot score them and a free token elsewhere is one an
    unsure decoder writes again and again in place of the line. Each call extends
    the previous call's prefixes (found by their ids, as beam search reorders its rows) by
    the character each chose, and scores the decoder's `candidates` likeliest characters,
    the only ones it may then choose (ESPnet's pre-beam).
    """

    def __init__(
        self,
        ctc_logits: torch.Tensor,
        blank: int,
        eos: int,
        skip: set[int],
        weight: float,
        candidates: int = 8,
    ) -> None:
        self.x = ctc_logits.float().log_softmax(-1)
        # The blank's log-probs and their running sum over the columns, the same every step.
        self.xb = self.x[..., blank].contiguous()
        self.cb = F.pad(self.xb[:, 1:], (1, 0)).cumsum(1)
        self.blank, self.eos, self.skip = blank, eos, sorted(skip - {eos, blank})
        self.skip_ids = torch.tensor(self.skip, dtype=torch.long, device=self.x.device)
        self.weight, self.k = weight, candidates
        self.known: dict[tuple, int] = {}

    @staticmethod
    def _phi(r: torch.Tensor, repeat: torch.Tensor) -> torch.Tensor:
        """Paths that may go on with a new character after each column: all of the prefix's
        (r: rows, T, 2), or after the same character only those ending in a blank
        (repeat: rows, K); (rows, T, K)."""
        every = torch.logaddexp(r[..., 0], r[..., 1]).unsqueeze(-1)
        return torch.where(repeat.unsqueeze(1), r[..., 1].unsqueeze(-1), every)

    @staticmethod
    def _advance(
        x: torch.Tensor,
        cb: torch.Tensor,
        r: torch.Tensor,
        repeat: torch.Tensor,
        empty: torch.Tensor,
    ) -> torch.Tensor:
        """The forward variables of each row's prefix extended by its chosen character (x:
        its log-probs, rows x T; cb: the blank's, summed over the columns from the second).
        Each recursion over the columns, v[t] = logaddexp(v[t-1], a[t-1]) + x[t], is the
        cumulative log-sum of a - cumsum(x) shifted back by cumsum(x): a logcumsumexp, no
        loop (its terms run to thousands; float32 keeps ~1e-3 of a nat)."""
        phi = CTCPrefixScorer._phi(r, repeat.unsqueeze(-1))[..., 0]
        start = torch.where(empty, x[:, 0], NEG).unsqueeze(1)
        cx = F.pad(x[:, 1:], (1, 0)).cumsum(1)
        rn = torch.logcumsumexp(torch.cat([start, (phi - cx)[:, :-1]], 1), 1) + cx
        rb = torch.logcumsumexp(F.pad((rn - cb)[:, :-1], (1, 0), value=NEG), 1) + cb
        return torch.stack([rn, rb], -1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        rows = scores.shape[0]
        beams = rows // self.x.shape[0]
        item = torch.arange(rows, device=scores.device) // beams
        x, xb, cb = (
            (self.x, self.xb, self.cb)
            if beams == 1
            else (self.x[item], self.xb[item], self.cb[item])
        )
        # Greedy search keeps its rows in place; beam search's are found by their prefix.
        keys = (
            [(i, tuple(ids)) for i, ids in zip(item.tolist(), input_ids.tolist(), strict=True)]
            if beams > 1
            else []
        )
        if input_ids.shape[1] == 1:  # the first step: every prefix empty
            r = torch.full((rows, x.shape[1], 2), NEG, device=x.device)
            r[..., 1] = torch.cumsum(xb, 1)
            psi = torch.zeros(rows, device=x.device)
            last = torch.full((rows,), -1, device=x.device)
            empty = torch.ones(rows, dtype=torch.bool, device=x.device)
        else:  # each row is a row of the last call (its parent) and one character more
            parent = (
                torch.tensor([self.known[(i, ids[:-1])] for i, ids in keys]) if beams > 1 else item
            )
            token = input_ids[:, -1]
            kept = torch.isin(token, self.skip_ids)
            pick = (self.cand[parent] == token.unsqueeze(-1)).int().argmax(1)
            r, last, empty = self.r[parent], self.last[parent], self.empty[parent]
            xc = x.gather(2, token.view(-1, 1, 1).expand(-1, x.shape[1], 1)).squeeze(-1)
            grown = self._advance(xc, cb, r, token == last, empty)
            r = torch.where(kept[:, None, None], r, grown)
            psi = torch.where(kept, self.psi[parent], self.cand_psi[parent, pick])
            last = torch.where(kept, last, token)
            empty = empty & kept
        logp = scores.float().log_softmax(-1)
        choosable = logp.clone()
        choosable[:, [self.blank, self.eos, *self.skip]] = NEG
        cand = choosable.topk(min(self.k, choosable.shape[1]), dim=1).indices  # (rows, K)
        xk = x.gather(2, cand.unsqueeze(1).expand(-1, x.shape[1], -1))
        phi = self._phi(r, cand == last.unsqueeze(-1))
        start = torch.where(empty.unsqueeze(-1), xk[:, 0], NEG).unsqueeze(1)
        # Graves' prefix probability: the candidate's first column after any of the prefix's.
        self.cand_psi = torch.logsumexp(torch.cat([start, phi[:, :-1] + xk[:, 1:]], 1), dim=1)
        self.r, self.psi, self.last, self.empty, self.cand = r, psi, last, empty, cand
        if beams > 1:
            self.known = {key: row for row, key in enumerate(keys)}
        gain = torch.full_like(logp, NEG)
        gain.scatter_(1, cand, self.cand_psi - psi.unsqueeze(-1))
        gain[:, self.skip] = 0.0 if input_ids.shape[1] == 1 else NEG
        gain[:, self.eos] = torch.logaddexp(r[:, -1, 0], r[:, -1, 1]) - psi
        return (1 - self.weight) * logp + self.weight * gain
