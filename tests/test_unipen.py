"""UNIPEN's pen trajectories drawn as a pre-training corpus (hwr.embedded.unipen)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hwr.data import read_lines
from hwr.embedded.unipen import Sample, detokenize, import_unipen, join_words, read_file
from hwr.errors import UserError


def _stroke(points: list[tuple[int, int]]) -> str:
    return ".PEN_DOWN\n" + "".join(f"{x} {y} 0\n" for x, y in points) + ".PEN_UP\n"


def _word(x: int, y: int = 0) -> str:
    """A word-sized zigzag, 300 units wide and 100 high (y up), starting at x."""
    return _stroke([(x + 30 * i, y + (100 if i % 2 else 0)) for i in range(11)])


@pytest.fixture
def unipen(tmp_path: Path) -> Path:
    """A UNIPEN tree of one lab and writer: pen lifts marked by empty .PEN_UP blocks (which
    are not components), a text line, a text written over two lines, and three words."""
    root = tmp_path / "train_r01_v07"
    (root / "include/lab/data").mkdir(parents=True)
    (root / "include/lab/lab.doc").write_text(".VERSION 1.0\n.COORD X Y T\n.HIERARCHY TEXT\n")
    ink = ".WRITER_ID w1\n" + "".join(_word(400 * i) for i in range(4))  # one line
    ink += _word(0, 0) + _word(0, -300)  # two lines, one above the other
    ink += "".join(_word(400 * i) for i in range(3))  # three words
    (root / "include/lab/data/w1.dat").write_text(ink)
    head = ".VERSION 1.0\n.INCLUDE lab/lab.doc\n.INCLUDE lab/data/w1.dat\n"
    (root / "data/8/lab").mkdir(parents=True)
    (root / "data/8/lab/w1.dat").write_text(
        head + '.SEGMENT TEXT 0-3 GOOD "Hello , world . It \\"works\\" !"\n'
        '.SEGMENT TEXT 4-5 ? "one line on top of another line"\n'
        '.SEGMENT TEXT 0 BAD "skipped"\n'
    )
    (root / "data/6/lab").mkdir(parents=True)
    (root / "data/6/lab/w1.dat").write_text(
        head + "".join(f'.SEGMENT WORD {6 + i} ? "{w}"\n' for i, w in enumerate(["ab", "cd", "ef"]))
    )
    return root


def test_components_are_the_blocks_with_points(unipen: Path):
    samples = read_file(unipen / "data/8/lab/w1.dat", unipen)
    assert [s.text for s in samples] == [
        'Hello, world. It "works"!',
        "one line on top of another line",
    ]
    first, two_lines = samples
    assert len(first.strokes) == 4 and first.writer == "lab/w1"
    assert first.strokes[3][0].tolist() == [1200.0, 0.0]  # the fourth word, not a pen lift
    assert two_lines.strokes[1][:, 1].max() == -200.0  # the word written below


def test_detokenize_writes_text_as_written():
    said = detokenize("We had , he said , a test ( a big one ) ?")
    assert said == "We had, he said, a test (a big one)?"
    assert detokenize("it is n't 7.91 % .") == "it isn't 7.91%."
    assert detokenize(r"guard sha\@l\@l walk") == "guard shall walk"  # a lab's letter marks
    assert detokenize(r"a \\ b \" c") == 'a \\ b " c'  # escapes undone


def test_import_draws_one_line_per_segment_and_leaves_out_two_line_ink(
    unipen: Path, tmp_path: Path
):
    out = tmp_path / "corpus"
    import_unipen(unipen, out, workers=1)
    lines = read_lines(out / "lines.csv", group_by="writer")
    texts = [x.text for x in lines]
    assert 'Hello, world. It "works"!' in texts and "one line on top of another line" not in texts
    # The words, set side by side into lines in the order written.
    assert " ".join(t for t in texts if t[0] in "ace") == "ab cd ef"
    assert {x.group for x in lines} == {"lab/w1"}
    with Image.open(next(x.image for x in lines if x.text.startswith("Hello"))) as im:
        pixels = np.asarray(im.convert("L"), dtype=float)
    assert im.height == 96 and im.width > 3 * im.height  # four words side by side
    assert pixels.min() < pixels.mean() - 40  # ink on paper


def test_import_names_the_repository_when_the_folder_is_not_unipen(tmp_path: Path):
    with pytest.raises(UserError, match="train_r01_v07"):
        import_unipen(tmp_path, tmp_path / "out")


def test_joined_words_stand_apart_by_the_line_s_height_not_a_short_word_s():
    """'so' then 'Hello': the gap follows the line's tallest word, so a short word does not
    sit against its neighbour (by its own height it would be 3-7 units)."""
    tall = Sample([np.array([[0.0, 0.0], [300.0, 100.0]])], "Hello", "w")
    short = Sample([np.array([[0.0, 0.0], [60.0, 10.0]])], "so", "w")
    for seed in range(20):
        (line,) = join_words([short, tall, tall], random.Random(seed), max_chars=60)[:1]
        if line.text.startswith("so Hello"):
            gap = line.strokes[1][:, 0].min() - line.strokes[0][:, 0].max()
            assert 30 <= gap <= 70
            return
    pytest.fail("no line joined the first two words")
