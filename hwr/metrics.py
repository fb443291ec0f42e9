"""How well a model reads lines: CER, WER, exact-line accuracy and character similarity.

All are torchmetrics, so they accumulate over batches and sync across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.functional.text import edit_distance
from torchmetrics.text import CharErrorRate, WordErrorRate

METRICS = ("cer", "wer", "accuracy", "char_similarity")


def line_cer(preds: Sequence[str], refs: Sequence[str]) -> torch.Tensor:
    """Per-line character error rate: edits / reference length (1 edit per char if empty)."""
    dist = edit_distance(list(preds), list(refs), reduction="none").float()
    return dist / torch.tensor([max(len(r), 1) for r in refs], dtype=torch.float)


class TextMetrics(nn.Module):
    """Corpus CER and WER, plus per-line accuracy and similarity averaged over lines.

    Character similarity is 1 - CER of a line, floored at 0, so a line of garbage
    scores 0 however long it is.
    """

    def __init__(self, sync: bool = True) -> None:
        """sync=False: this process's lines only, even under DDP (what one process reads
        alone, as train.py's reading with the language model, must not wait for the rest)."""
        super().__init__()
        self.cer = CharErrorRate(sync_on_compute=sync)
        self.wer = WordErrorRate(sync_on_compute=sync)
        self.accuracy = MeanMetric(sync_on_compute=sync)
        self.char_similarity = MeanMetric(sync_on_compute=sync)
        self.n_lines = SumMetric(sync_on_compute=sync)

    def update(self, preds: Sequence[str], refs: Sequence[str]) -> torch.Tensor:
        """Add a batch; returns the per-line CER, for reports."""
        preds, refs = list(preds), list(refs)
        self.cer.update(preds, refs)
        self.wer.update(preds, refs)
        per_line = line_cer(preds, refs)
        self.accuracy.update((per_line == 0).float())
        self.char_similarity.update((1 - per_line).clamp(min=0))
        self.n_lines.update(len(preds))
        return per_line

    def compute(self) -> dict[str, float]:
        scores = {name: float(getattr(self, name).compute()) for name in METRICS}
        return {**scores, "n_lines": int(self.n_lines.compute())}

    def reset(self) -> None:
        for name in (*METRICS, "n_lines"):
            getattr(self, name).reset()
