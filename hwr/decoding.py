"""Reading lines: the decoder's search, steered by the CTC head and the writer's language model.

Every reading hwr gives (validation, evaluate.py, predict.py, the labelling page's pre-fill)
goes through `read_batch`, or `read_images` for pictures. The decoder's candidates for each
next token are rescored by up to two `LogitsProcessor`s, for greedy and beam search alike:

- `CTCPrefixScorer`, for a model with a CTC head (`hwr.embedded.ctc`): joint CTC/attention
  decoding (Watanabe et al. 2017, as speech recognisers decode) scores every candidate
  character by (1 - w) x the decoder's log-probability + w x how much the CTC probability
  of the prefix changes when the character is added (Graves' prefix probability, by the
  forward recursion over the columns). A hypothesis the picture does not hold then loses,
  however fluent.
- `LMScorer`, for a model saved with a language model of the writer's text (`hwr.lm`):
  shallow fusion, + weight x the log-probability of the characters a token adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TrOCRProcessor,
    VisionEncoderDecoderModel,
)
from transformers.modeling_outputs import BaseModelOutput

from hwr.embedded.ctc import ctc_reader
from hwr.embedded.tiny import known_languages, language_id
from hwr.errors import UserError, require_count
from hwr.images import batching_order
from hwr.lm import BOS, EOS, CharLM
from hwr.machine import rebalance

NEG = -1e30  # log 0, finite so that sums of it stay comparable
# The CTC head's share in joint decoding, unless told otherwise (model.ctc_weight): measured
# on held-out writers (model card).
JOINT_WEIGHT = 0.5
# Candidates per step the scorers weigh (ESPnet's pre-beam): the decoder's likeliest.
CANDIDATES = 8
# Batches read_images encodes ahead to order a CTC model's lines by reading length.
LOOKAHEAD = 4


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
    add nothing to the CTC prefix (<s>, which some decoders write first; a language token,
    which the decoder writes first when not told one): allowed as the first token only, as
    the head cannot score them and a free token elsewhere is one an unsure decoder writes
    again and again in place of the line. Each call extends
    the previous call's prefixes (found by their ids, as beam search reorders its rows) by
    the character each chose, and scores the decoder's `candidates` likeliest characters,
    the only ones it may then choose (ESPnet's pre-beam). `prompt` is how many tokens the
    decoder was given before its first choice (the start token, and the language it is told).
    """

    def __init__(
        self,
        ctc_logits: torch.Tensor,
        blank: int,
        eos: int,
        skip: set[int],
        weight: float,
        candidates: int = CANDIDATES,
        prompt: int = 1,
    ) -> None:
        self.x = ctc_logits.float().log_softmax(-1)
        # The blank's log-probs and their running sum over the columns, the same every step.
        self.xb = self.x[..., blank].contiguous()
        self.cb = F.pad(self.xb[:, 1:], (1, 0)).cumsum(1)
        self.blank, self.eos, self.skip = blank, eos, sorted(skip - {eos, blank})
        self.skip_ids = torch.tensor(self.skip, dtype=torch.long, device=self.x.device)
        self.weight, self.k, self.prompt = weight, candidates, prompt
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
        first = input_ids.shape[1] == self.prompt
        if first:  # every prefix empty
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
        gain[:, self.skip] = 0.0 if first else NEG
        gain[:, self.eos] = torch.logaddexp(r[:, -1, 0], r[:, -1, 1]) - psi
        return (1 - self.weight) * logp + self.weight * gain


class LMScorer(LogitsProcessor):
    """Shallow fusion with a character language model, for `generate` (greedy or beam).

    Each of the CANDIDATES best-scored tokens (after the CTC scorer, if any) gains
    lm.weight x log P(the characters it adds | the line so far) + lm.bonus per character
    (the language model alone would favour short lines); the end token gains the log-
    probability of the line ending there; every other token is out. A token writes one
    character in the embedded model's tokenizer, a piece of a word in a BPE one (TrOCR's),
    scored character by character. `size` is the decoder's vocabulary (the scores' width).
    """

    def __init__(self, lm: CharLM, tokenizer, size: int, eos: int) -> None:
        self.lm, self.eos = lm, eos
        self.text, self.symbol, self.length = token_table(lm, tokenizer, size)
        self.end = lm.index[lm.encode(EOS)]

    def context(self, ids: list[int]) -> str:
        """The line's last characters (order - 1 of them), the line start marked."""
        need, got = self.lm.order - 1, ""
        for i in reversed(ids):
            got = self.text[i] + got
            if len(got) >= need:
                return got
        return BOS + got

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        contexts = [self.context(ids) for ids in input_ids.tolist()]
        dist = torch.from_numpy(np.stack([self.lm.dist(c) for c in contexts]))
        choosable = scores.clone()
        choosable[:, self.eos] = -torch.inf
        cand = choosable.topk(min(CANDIDATES, scores.shape[1]), dim=1).indices
        symbol = self.symbol[cand]
        lp = dist.gather(1, symbol.clamp(min=0)).where(symbol >= 0, 0.0)
        for row, col in (symbol < 0).nonzero().tolist():  # tokens of several characters
            lp[row, col] = self.lm.logprob_after(self.text[cand[row, col]], contexts[row])
        gain = self.lm.weight * lp + self.lm.bonus * self.length[cand]
        out = torch.full_like(scores, NEG)
        out.scatter_(1, cand, scores.gather(1, cand) + gain.to(scores.dtype))
        out[:, self.eos] = scores[:, self.eos] + self.lm.weight * dist[:, self.end]
        return out


@lru_cache(maxsize=4)
def token_table(lm: CharLM, tokenizer, size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """What each of the decoder's `size` token ids writes, in the language model's
    characters ("" for special tokens), as `batch_decode` joins them; the model's index of
    each one-character token's character (-1 for the others); how many characters each
    writes. Kept: a BPE vocabulary takes a second."""
    special = set(tokenizer.all_special_ids)
    text = [
        ""
        if i in special or i >= len(tokenizer)
        else lm.encode(tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]))
        for i in range(size)
    ]
    symbol = torch.tensor([lm.index[t] if len(t) == 1 else -1 for t in text], dtype=torch.long)
    return text, symbol, torch.tensor([len(t) for t in text], dtype=torch.float32)


def check_reading(
    num_beams: int,
    max_new_tokens: int | None,
    ctc_weight: float | None,
    lm_weight: float | None = None,
) -> None:
    """The model.* reading settings (train.py, predict.py), checked before the model loads:
    a bad setting should not cost a minute."""
    require_count("model.num_beams", num_beams, 1)
    if lm_weight is not None and not lm_weight >= 0:
        raise UserError(
            f"model.lm_weight={lm_weight}: must be 0 or more (0: without the language model), "
            "or null for the weight chosen when the model was tuned"
        )
    require_count("model.max_new_tokens", max_new_tokens, 1)
    if ctc_weight is not None and not 0.0 <= ctc_weight < 1.0:
        raise UserError(
            f"model.ctc_weight={ctc_weight}: must be in [0, 1) (0: the decoder alone), "
            "or null for the default"
        )


@torch.no_grad()
def read_batch(
    model: VisionEncoderDecoderModel,
    processor: TrOCRProcessor,
    pixel_values: torch.Tensor | None,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    confidence: bool = True,
    encoder_outputs: BaseModelOutput | None = None,
    ctc_weight: float | None = None,
    lm: CharLM | None = None,
) -> tuple[list[str], list[float] | None]:
    """Decode a batch of processed line images (or the encoder's outputs for them, when
    already computed); also each line's confidence, if asked. A model with a CTC head reads
    by joint CTC/attention decoding, the head's share `ctc_weight` (None: JOINT_WEIGHT; 0:
    the decoder alone); with a language model `lm` (`hwr.lm.load_lm`), fused at its weight.
    A model told its language (`hwr.model.set_language`) is given that language's token
    after the start token; one with language tokens but not told writes the one it sees.

    Confidence is the geometric mean of the chosen tokens' probabilities, end token
    included: 1.0 when the model is sure of every character, lower where it hesitated.
    It needs every step's scores, so scoring (validation) leaves it out.
    """
    # An explicit max_new_tokens=None would mean transformers' default of 20 tokens, not the
    # model's generation config: pass it only when set.
    limit = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    weight = JOINT_WEIGHT if ctc_weight is None else ctc_weight
    head = ctc_reader(model) if weight else None
    if head is not None and encoder_outputs is None:
        encoder_outputs = model.encoder(pixel_values=pixel_values)
    if encoder_outputs is not None:  # generate widens it in place for beams: a fresh one
        encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state)
    tok = processor.tokenizer
    told = language_id(tok, getattr(model.generation_config, "language", None))
    prompt = {}
    if told is not None:
        states = pixel_values if encoder_outputs is None else encoder_outputs.last_hidden_state
        start = model.generation_config.decoder_start_token_id
        ids = torch.tensor([[start, told]], device=states.device).expand(len(states), -1)
        prompt = {"decoder_input_ids": ids}
    scorers = []
    if head is not None:
        logits = head(encoder_outputs.last_hidden_state)
        skip = {tok.bos_token_id, *(language_id(tok, x) for x in known_languages(tok))}
        scorers.append(
            CTCPrefixScorer(
                logits,
                tok.pad_token_id,
                tok.eos_token_id,
                skip,
                weight,
                prompt=1 if told is None else 2,
            )
        )
    if lm is not None and lm.weight:
        size = model.config.decoder.vocab_size
        scorers.append(LMScorer(lm, tok, size, tok.eos_token_id))
    given = {"pixel_values": pixel_values} if encoder_outputs is None else {}
    out = model.generate(
        **given,
        **prompt,
        encoder_outputs=encoder_outputs,
        num_beams=num_beams,
        **limit,
        logits_processor=LogitsProcessorList(scorers),
        output_scores=confidence,
        return_dict_in_generate=True,
    )
    texts = [t.strip() for t in processor.batch_decode(out.sequences, skip_special_tokens=True)]
    if not confidence:
        return texts, None
    logp = model.compute_transition_scores(
        out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
    )
    generated = out.sequences[:, -logp.shape[1] :]
    valid = (generated != model.generation_config.pad_token_id) & torch.isfinite(logp)
    mean = torch.where(valid, logp, 0.0).sum(1) / valid.sum(1).clamp(min=1)
    return texts, mean.exp().tolist()


@torch.no_grad()
def read_images(
    model: VisionEncoderDecoderModel,
    processor: TrOCRProcessor,
    images: Sequence[Image.Image],
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    ctc_weight: float | None = None,
    lm: CharLM | None = None,
) -> tuple[list[str], list[float]]:
    """Read line images in batches, on the model's device and in its dtype (predict's
    precision=bf16 casts the model: faster than autocast, which casts activations back and
    forth at every layer); texts and confidences in the images' order.

    Lines are encoded in `batching_order`. A model with a CTC head encodes LOOKAHEAD
    batches at a time and decodes them in order of the length of the head's reading, so a
    batch's rows end together: a quarter fewer decoder steps on Copiste's test writers
    than by shape alone.
    """
    weights = next(model.parameters())
    head = ctc_reader(model)
    order = batching_order([image.size for image in images])
    chunk = batch_size * (LOOKAHEAD if head is not None else 1)
    texts, confidences = [""] * len(images), [0.0] * len(images)
    bar = tqdm(total=len(images), desc="reading", unit="line")
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        encoded = []
        for s in range(0, len(idx), batch_size):
            rebalance()  # another hwr process may have started or ended
            batch = [images[i] for i in idx[s : s + batch_size]]
            pixels = processor(images=batch, return_tensors="pt").pixel_values
            pixels = pixels.to(weights.device, weights.dtype)
            encoded.append(model.encoder(pixel_values=pixels).last_hidden_state)
        states = torch.cat(encoded)
        if head is not None:
            lengths = [len(r) for r in ctc_greedy(head(states), processor.tokenizer.pad_token_id)]
            perm = sorted(range(len(idx)), key=lengths.__getitem__)
        else:
            perm = list(range(len(idx)))
        for s in range(0, len(idx), batch_size):
            rows = perm[s : s + batch_size]
            got, conf = read_batch(
                model,
                processor,
                None,
                num_beams,
                max_new_tokens,
                encoder_outputs=BaseModelOutput(last_hidden_state=states[rows]),
                ctc_weight=ctc_weight,
                lm=lm,
            )
            for row, text, c in zip(rows, got, conf, strict=True):
                texts[idx[row]], confidences[idx[row]] = text, c
            bar.update(len(rows))
    bar.close()
    return texts, confidences
