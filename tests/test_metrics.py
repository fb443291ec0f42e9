"""Scores on strings whose answers are known by hand."""

import pytest

from hwr.metrics import TextMetrics, line_cer


def test_perfect_reading_scores_perfectly():
    m = TextMetrics()
    m.update(["hello world", "abc"], ["hello world", "abc"])
    assert m.compute() == {
        "cer": 0.0,
        "wer": 0.0,
        "accuracy": 1.0,
        "char_similarity": 1.0,
        "n_lines": 2,
    }


def test_scores_accumulate_over_batches():
    m = TextMetrics()
    m.update(["hallo"], ["hello"])  # 1 edit in 5 chars
    m.update(["abc", "xyz"], ["abc", "abcdef"])  # 0 edits; 6 edits in 6 chars
    scores = m.compute()
    assert scores["cer"] == pytest.approx(7 / 14)  # corpus CER: edits / reference chars
    assert scores["accuracy"] == pytest.approx(1 / 3)
    assert scores["char_similarity"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert scores["wer"] == pytest.approx(2 / 3)
    assert scores["n_lines"] == 3


def test_similarity_is_floored_at_zero_for_long_garbage():
    m = TextMetrics()
    per_line = m.update(["x" * 50], ["ab"])
    assert per_line.tolist() == [pytest.approx(25.0)]  # CER can pass 1
    assert m.compute()["char_similarity"] == 0.0


def test_reset_forgets():
    m = TextMetrics()
    m.update(["a"], ["b"])
    m.reset()
    m.update(["b"], ["b"])
    assert m.compute()["accuracy"] == 1.0


def test_line_cer():
    assert line_cer(["kitten"], ["sitting"]).tolist() == [pytest.approx(3 / 7)]
