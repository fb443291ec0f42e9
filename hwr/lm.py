"""A character n-gram language model of the writer's own text, read jointly with the model.

A person's notes repeat their names, places, abbreviations and turns of phrase; a decoder
trained on other corpora writes those corpora's words where it cannot read. Estimated from
the training split's transcriptions (and any text the user adds), this model pulls the
reading back toward the writer's words, in their language (fused in decoding by
`hwr.decoding.LMScorer`; PyLaia's character 6-gram took 12% off CER over 12 datasets).

Interpolated modified Kneser-Ney (Chen & Goodman 1998), as KenLM estimates it, saved as an
ARPA file (`lm.arpa`, readable by KenLM and SRILM) beside the model, with the weight chosen
on validation lines in `lm.json`. Our own estimator: KenLM's Python module only queries,
NLTK's `lm` is slow, and a 6-gram of a few thousand lines takes a second here.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from torchmetrics.functional.text import char_error_rate

from hwr.errors import UserError
from hwr.report import write_json, write_text

BOS, EOS, UNK = "\x02", "\x03", "\x00"  # line start, line end, a character it never saw
ARPA_NAMES = {BOS: "<s>", EOS: "</s>", UNK: "<unk>", " ": "<space>"}
LM_FILE, SETTINGS_FILE = "lm.arpa", "lm.json"
LM_NAME = "LM"  # how reports name a reading with it: "tuned + LM"
LOG10 = math.log(10)
NO_PROB = -99.0  # ARPA's log10 probability of <s>, which is never predicted
CACHE_LIMIT = 200_000  # next-character distributions kept (a few hundred bytes each)


def clean(text: str) -> str:
    """A line as the model sees it: runs of white space as one space, the marker
    characters out."""
    return " ".join(text.translate({ord(c): None for c in (BOS, EOS, UNK)}).split())


class CharLM:
    """Log-probabilities of the next character given the ones before (natural logs).

    `probs` maps each known n-gram (context + character) to its interpolated log-probability,
    `backoffs` each context to the weight of the shorter context's distribution: the ARPA
    representation, queried as KenLM does. `weight` and `bonus` are how decoding uses it:
    score + weight x log P(character) + bonus per character written, as chosen for reading
    with `beams` (1: greedy; beam search gains more from it).
    """

    def __init__(
        self,
        order: int,
        probs: dict[str, float],
        backoffs: dict[str, float],
        weight: float = 0.0,
        bonus: float = 0.0,
        lines: int = 0,
        beams: int = 1,
    ) -> None:
        self.order, self.probs, self.backoffs = order, probs, backoffs
        self.weight, self.bonus, self.lines, self.beams = weight, bonus, lines, beams
        self.symbols = sorted(g for g in probs if len(g) == 1 and g != BOS)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.unigrams = np.array([probs[s] for s in self.symbols], dtype=np.float32)
        children: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        for gram, lp in probs.items():
            if len(gram) > 1:
                children[gram[:-1]][0].append(self.index[gram[-1]])
                children[gram[:-1]][1].append(lp)
        self.children = {
            h: (np.array(i), np.array(p, dtype=np.float32)) for h, (i, p) in children.items()
        }
        self._dists: dict[str, np.ndarray] = {}

    @classmethod
    def estimate(cls, texts: Iterable[str], order: int = 6) -> CharLM:
        """Estimate from lines of text (each a sentence: start and end are modelled)."""
        if order < 1:
            raise UserError(f"lm.order={order}: must be 1 or more (6: PyLaia's choice)")
        counts = [Counter() for _ in range(order + 1)]
        lines = 0
        for text in texts:
            s = BOS + clean(text) + EOS
            lines += 1
            for i in range(1, len(s)):
                for k in range(1, min(order, i + 1) + 1):
                    counts[k][s[i - k + 1 : i + 1]] += 1
        if not lines:
            raise UserError("The language model has no text to learn from: no training lines.")
        # Lower orders count the different characters seen before an n-gram (Kneser-Ney),
        # except n-grams at the line start, which nothing precedes.
        adjusted = [counts[order]] * (order + 1)
        for k in range(order - 1, 0, -1):
            a = Counter(g[1:] for g in counts[k + 1])
            a |= {g: c for g, c in counts[k].items() if g[0] == BOS}
            adjusted[k] = a
        symbols = {g for g in counts[1]} | {UNK}
        probs: dict[str, float] = {BOS: NO_PROB * LOG10}
        backoffs: dict[str, float] = {}
        for k in range(1, order + 1):
            d = discounts(adjusted[k])
            totals: Counter = Counter()
            kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
            for g, c in adjusted[k].items():
                totals[g[:-1]] += c
                kinds[g[:-1]][min(c, 3) - 1] += 1
            gamma = {
                h: sum(di * n for di, n in zip(d, kinds[h], strict=True)) / t
                for h, t in totals.items()
            }
            for g, c in adjusted[k].items():
                h = g[:-1]
                lower = (
                    -math.log(len(symbols))
                    if k == 1
                    else backoff_logprob(probs, backoffs, g[-1], h[1:])
                )
                p = max(c - d[min(c, 3) - 1], 0.0) / totals[h] + gamma[h] * math.exp(lower)
                probs[g] = math.log(p)
            if k == 1:
                for s in symbols - set(adjusted[1]):  # <unk>: the share left to unseen ones
                    probs[s] = math.log(gamma[""] / len(symbols))
            backoffs |= {h: math.log(gm) for h, gm in gamma.items() if h and gm > 0}
        return cls(order, probs, backoffs, lines=lines)

    def encode(self, text: str) -> str:
        """Characters it never saw as <unk>."""
        return "".join(c if c in self.index else UNK for c in text)

    def logprob_next(self, char: str, context: str) -> float:
        """log P(char | context), context in this model's characters."""
        context = context[max(len(context) - self.order + 1, 0) :]
        return backoff_logprob(self.probs, self.backoffs, char, context)

    def dist(self, context: str) -> np.ndarray:
        """log P(every symbol | context), in `symbols` order; kept for the next call."""
        context = context[max(len(context) - self.order + 1, 0) :]
        got = self._dists.get(context)
        if got is None:
            if len(self._dists) > CACHE_LIMIT:
                self._dists.clear()
            if context:
                got = self.dist(context[1:]) + np.float32(self.backoffs.get(context, 0.0))
            else:
                got = self.unigrams.copy()
            kids = self.children.get(context)
            if kids is not None:
                got[kids[0]] = kids[1]
            self._dists[context] = got
        return got

    def logprob_after(self, chars: str, context: str) -> float:
        """log P(chars, one after another | context), all in this model's characters."""
        return sum(self.logprob_next(c, context + chars[:i]) for i, c in enumerate(chars))

    def logprob(self, text: str) -> float:
        """log P(the whole line), its end included."""
        return self.logprob_after(self.encode(clean(text)) + EOS, BOS)

    def save(self, folder: Path) -> None:
        """lm.arpa (log10, tokens by name: <space>, <s>, </s>, <unk>) and lm.json (how to
        read with it), each written whole or not at all."""
        folder = Path(folder)
        by_order: dict[int, list[str]] = defaultdict(list)
        for gram, lp in sorted(self.probs.items()):
            words = " ".join(ARPA_NAMES.get(c, c) for c in gram)
            row = f"{lp / LOG10:.6f}\t{words}"
            if gram in self.backoffs:
                row += f"\t{self.backoffs[gram] / LOG10:.6f}"
            by_order[len(gram)].append(row)
        text = ["", "\\data\\"] + [f"ngram {k}={len(by_order[k])}" for k in sorted(by_order)]
        for k in sorted(by_order):
            text += ["", f"\\{k}-grams:", *by_order[k]]
        write_text(folder / LM_FILE, "\n".join([*text, "", "\\end\\", ""]))
        write_json(
            folder / SETTINGS_FILE,
            {
                "order": self.order,
                "weight": self.weight,
                "bonus": self.bonus,
                "beams": self.beams,
                "lines": self.lines,
            },
        )

    @classmethod
    def load(cls, folder: Path) -> CharLM:
        folder = Path(folder)
        names = {v: k for k, v in ARPA_NAMES.items()}
        probs, backoffs = {}, {}
        order = 0
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text(encoding="utf-8"))
            for row in (folder / LM_FILE).read_text(encoding="utf-8").splitlines():
                parts = row.split("\t")
                if len(parts) < 2 or row.startswith("ngram "):
                    continue
                gram = "".join(names.get(w, w) for w in parts[1].split(" "))
                order = max(order, len(gram))
                probs[gram] = float(parts[0]) * LOG10
                if len(parts) > 2:
                    backoffs[gram] = float(parts[2]) * LOG10
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"{folder / LM_FILE}: the language model could not be read ({e}). Delete "
                f"{LM_FILE} and {SETTINGS_FILE} to read without it, or train the model again."
            ) from e
        return cls(
            settings.get("order", order),
            probs,
            backoffs,
            settings.get("weight", 0.0),
            settings.get("bonus", 0.0),
            settings.get("lines", 0),
            settings.get("beams", 1),
        )


def backoff_logprob(
    probs: dict[str, float], backoffs: dict[str, float], char: str, context: str
) -> float:
    """log P(char | context) as an ARPA model answers: the longest known n-gram's, after the
    backoff weights of the longer contexts."""
    penalty = 0.0
    while True:
        lp = probs.get(context + char)
        if lp is not None:
            return penalty + lp
        if not context:
            return penalty + probs[UNK]
        penalty += backoffs.get(context, 0.0)
        context = context[1:]


def discounts(adjusted: Counter) -> tuple[float, float, float]:
    """Modified Kneser-Ney's discounts for n-grams seen once, twice, three times or more,
    from the counts of counts; on text too small for them, one discount for all."""
    n = Counter(c for c in adjusted.values() if c <= 4)
    if n[1] and n[2]:
        y = n[1] / (n[1] + 2 * n[2])
        if n[3] and n[4]:
            d = (1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])
            if all(0 < di < i + 1 for i, di in enumerate(d)):
                return d
        return (y, y, y)
    return (0.5, 0.5, 0.5)


def load_lm(name_or_path: str, weight: float | None = None) -> CharLM | None:
    """The language model saved beside a model (train.py writes it), read with `weight`
    (None: the one chosen on validation lines; 0: none), or None if the folder has none."""
    if weight == 0 or str(name_or_path) in ("embedded", "tiny"):
        return None
    folder = Path(str(name_or_path)).expanduser()
    if not (folder / LM_FILE).is_file():
        return None
    lm = CharLM.load(folder)
    if weight is not None:
        lm.weight = weight
    return lm if lm.weight else None


def read_texts(paths: Sequence[str]) -> list[str]:
    """Lines of the text files the user adds to the language model (lm.texts), one
    sentence or name per line; a missing file is named."""
    lines = []
    for path in paths:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"lm.texts: {p} is not a file. Name plain-text files of your notes.")
        lines += [t for t in p.read_text(encoding="utf-8", errors="replace").splitlines() if t]
    return lines


def choose_weight(
    lm: CharLM,
    read: Callable[[CharLM | None], list[str]],
    references: Sequence[str],
    weights: Sequence[float],
    bonuses: Sequence[float],
) -> list[dict]:
    """Read the lines at each weight and bonus of the grid (weight 0: without the model);
    set lm.weight and lm.bonus to the best (corpus CER), and return every point's CER."""
    grid = [(0.0, 0.0)] + [(w, b) for w in weights if w > 0 for b in bonuses]
    points = []
    for w, b in grid:
        lm.weight, lm.bonus = w, b
        cer = float(char_error_rate(read(lm if w else None), list(references)))
        points.append({"weight": w, "bonus": b, "cer": cer})
    best = min(points, key=lambda p: p["cer"])
    lm.weight, lm.bonus = best["weight"], best["bonus"]
    return points
