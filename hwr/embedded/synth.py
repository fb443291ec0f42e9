"""Handwriting-style line images rendered from text, in the project's CSV format.

Two jobs: the shipped `line_data/` sample (one held-out font, so fine-tuning has a new
"writer" to learn), and an endless stream of varied lines for pre-training the embedded
model. Fonts are handwriting OFL fonts installed from PyPI (`fontpkg-*`), and for
pre-training, as many more as `--get-fonts` fetches from npm's @fontsource (OFL, Apache).

    python -m hwr.embedded.synth --out line_data                      # the shipped sample
    python -m hwr.embedded.synth --out synth --lines 5000 --sheet sheet.png
    python -m hwr.embedded.synth --get-fonts ../fonts    # pre-training's extra fonts
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import multiprocessing
import os
import random
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path

import fontpkg
import numpy as np
from faker import Faker
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from hwr.report import write_text

# Fonts the embedded model learns from, and fonts kept out to stand in for new writers
# (Caveat writes the shipped sample, so fine-tuning on it shows a real gain).
TRAIN_FONTS = (
    "kalam",
    "dancing-script",
    "shadows-into-light",
    "permanent-marker",
    "satisfy",
    "zeyada",
    "yellowtail",
    "great-vibes",
    "pacifico",
    "delius",
)
HELD_OUT_FONTS = ("caveat", "indie-flower")

# Notes in the style of a person's notebook, written for this sample (no licence strings).
SAMPLE_TEXT = """\
Meeting with Anna on Tuesday at 10:30, room 4B.
Buy milk, eggs, bread and two lemons.
The train leaves at 7:45 from platform 3.
Call the garage about the brakes before Friday.
Remember: the key is under the blue pot.
Read chapter 12 again, the proof is not clear.
Total for March: 1,284.50 euros.
Ideas for the garden: tomatoes, basil, mint.
Dentist moved to 14 May, 9 am.
Letter to Paul about the summer house.
The experiment failed twice; check the wiring.
Water the plants every second day.
Page 57 has the recipe for plum cake.
Pick up the parcel at the post office.
Ask Marie if she still has the old maps.
Flight AF 1234 lands at 18:05.
Backup the laptop before the update!
Notes from the lecture on river ecology.
Temperature at noon was 23 degrees.
The meeting is cancelled, see you next week.
Rendez-vous chez Claire, 12 rue des Lilas.
Acheter du pain et des pommes pour demain.
Le cours de piano est décalé à jeudi.
Penser à rappeler le médecin avant midi.
Quelle belle journée au bord du lac !
Il faut réparer la fenêtre de la cuisine.
Budget vacances : 850 euros pour deux.
Lire le rapport avant la réunion de lundi.
Where did I put the receipts from June?
Three things to fix: door, lamp, bike.
The library closes early on Saturdays.
New password hint: first dog and year.
Recipe: 200 g flour, 3 eggs, 1 cup milk.
Send the invoice to the client by the 30th.
Tickets for the concert are in the drawer.
Walk 5 km before breakfast, if it is dry.
Draft the introduction, then the methods.
Birthday gift for Tom: a book on birds.
Check the oil and the tyre pressure.
Finish the notes before the end of term.
"""


# Handwriting families of npm's @fontsource (Google Fonts' handwriting, OFL or Apache 2.0),
# fetched by --get-fonts for pre-training. Left out: fontpkg's, the held-out fonts' kin (Caveat
# Brush) and fonts whose small letters are capitals (Rock Salt, Walter Turncoat, Give You Glory).
_FONTSOURCE = """
    homemade-apple cedarville-cursive reenie-beanie gloria-hallelujah la-belle-aurore
    nothing-you-could-do over-the-rainbow waiting-for-the-sunrise just-another-hand
    covered-by-your-grace sue-ellen-francisco schoolbell architects-daughter coming-soon
    patrick-hand handlee gochi-hand loved-by-the-king mrs-saint-delafield meddon
    dawning-of-a-new-day sacramento allura parisienne alex-brush marck-script mr-dafoe
    herr-von-muellerhoff petit-formal-script pinyon-script qwigley rouge-script ruthie
    tangerine italianno kristi calligraffitti crafty-girls neucha short-stack
    annie-use-your-telescope bad-script cookie damion kaushan-script shadows-into-light-two
    swanky-and-moo-moo the-girl-next-door vibur whisper birthstone ms-madi mynerve
    square-peg oooh-baby licorice send-flowers ephesis updock comforter caramel estonia
    grey-qo hurricane inspiration island-moments love-light lovers-quarrel moon-dance
    my-soul qwitcher-grypen the-nautigal twinkle-star vujahday-script windsong babylonica
    bonheur-royale corinthia ballet explora gwendolyn mea-culpa passions-conflict allison
    sofia style-script sedgwick-ave edu-nsw-act-foundation edu-sa-beginner edu-tas-beginner
    edu-vic-wa-nt-beginner edu-qld-beginner playwrite-us-trad playwrite-us-modern
    playwrite-fr-moderne playwrite-fr-trad playwrite-de-grund playwrite-de-sas
    playwrite-it-moderna playwrite-it-trad playwrite-es playwrite-es-deco playwrite-nz
    playwrite-au-qld playwrite-au-vic playwrite-be-wal playwrite-br playwrite-ca
    playwrite-cl playwrite-co playwrite-cu playwrite-cz playwrite-dk-loopet
    playwrite-dk-uloopet playwrite-ie playwrite-in playwrite-is playwrite-mx
    playwrite-ng-modern playwrite-nl playwrite-no playwrite-pe playwrite-pl playwrite-pt
    playwrite-ro playwrite-sk playwrite-tz playwrite-vn playwrite-za playwrite-at
    playwrite-ar playwrite-hr playwrite-hu playwrite-id nanum-pen-script gaegu
"""
FONTSOURCE = tuple(_FONTSOURCE.split())
FONT_FILES = (".ttf", ".otf", ".woff")


def font_path(font: str) -> Path:
    """A font by fontpkg family name, or a font file's path."""
    return Path(font) if font.endswith(FONT_FILES) else fontpkg.path(font)


def font_files(folder: Path | str) -> list[str]:
    """The font files under a folder (as --get-fonts fills it), in a fixed order."""
    return sorted(str(p) for p in Path(folder).expanduser().rglob("*") if p.suffix in FONT_FILES)


@cache
def charset(font: str) -> frozenset[str]:
    """The characters a font draws: a line is rendered only in a font that has them all
    (a missing glyph would draw a box under a label that names a letter)."""
    with TTFont(font_path(font), lazy=True) as f:
        return frozenset(map(chr, f.getBestCmap())) | {" "}


def font_for(text: str, fonts: Sequence[str], rng: random.Random) -> str:
    """A font, drawn from fonts, that has every character of the text (else a fontpkg one)."""
    chars = set(text)
    for _ in range(8):
        font = rng.choice(fonts)
        if chars <= charset(font):
            return font
    return rng.choice(TRAIN_FONTS)


def get_fonts(out_dir: Path, families: Sequence[str] = FONTSOURCE) -> list[str]:
    """Fetch @fontsource families with npm into out_dir/<family>/: the Latin subset's
    regular weight, with its LICENSE and package.json (which names the licence)."""
    out_dir = Path(out_dir)
    got = []
    for family in tqdm(families, desc="fonts", unit="family"):
        folder = out_dir / family
        if font_files(folder):
            got.append(family)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            packed = subprocess.run(
                ["npm", "pack", "--silent", f"@fontsource/{family}"],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            if packed.returncode:
                tqdm.write(f"{family}: npm pack failed: {packed.stderr.strip()[-200:]}")
                continue
            with tarfile.open(Path(tmp) / packed.stdout.split()[-1]) as tar:
                wanted = [
                    m
                    for m in tar.getmembers()
                    if m.name.endswith(("latin-400-normal.woff", "/LICENSE", "/package.json"))
                    and "-ext-" not in m.name
                ]
                folder.mkdir(parents=True, exist_ok=True)
                for member in wanted:
                    (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())
        got.append(family)
    return got


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size=size)


@cache
def _advance(name: str, size: int, ch: str) -> float:
    return _font(name, size).getlength(ch)


@cache
def _glyph(name: str, size: int, ch: str) -> tuple[Image.Image, int, int]:
    """A character's ink bitmap and its offset from the pen position (baseline, left),
    rendered once: drawing every glyph through FreeType each time was the slowest step."""
    font = _font(name, size)
    left, top, right, bottom = font.getbbox(ch, anchor="ls")
    glyph = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(glyph).text((-left, -top), ch, font=font, fill=255, anchor="ls")
    return glyph, left, top


def _draw_glyphs(text: str, font_name: str, rng: random.Random) -> Image.Image:
    """Ink mask (255 = ink) of the text, glyph by glyph: size, place and spacing jitter."""
    size = rng.randint(38, 46)
    spacing = rng.uniform(-0.06, 0.12)
    width = int(sum(_advance(font_name, size + 4, c) for c in text) * 1.3) + 4 * size
    mask = Image.new("L", (width, 3 * size), 0)
    x, drift = size / 2, 0.0
    for ch in text:
        glyph_size = size + round(rng.gauss(0, 1.2))
        drift = 0.9 * drift + rng.gauss(0, 0.6)
        glyph, left, top = _glyph(font_name, glyph_size, ch)
        at = (round(x + rng.gauss(0, 0.6)) + left, round(size + drift) + top)
        mask.paste(255, (*at, at[0] + glyph.width, at[1] + glyph.height), glyph)
        x += _advance(font_name, glyph_size, ch) * (1 + spacing + rng.gauss(0, 0.04))
    return mask


def _wave(mask: np.ndarray, rng: random.Random, scale: float) -> np.ndarray:
    """Baseline drift: shift each column up or down along a slow wave (sizes in pixels of
    the drawn glyphs, times scale)."""
    h, w = mask.shape
    amp, period, phase = rng.uniform(0, 4), rng.uniform(300, 1500), rng.uniform(0, 6.3)
    amp, period = amp * scale, period * scale
    shift = (amp * np.sin(np.arange(w) * 2 * np.pi / period + phase)).round().astype(int)
    rows = np.clip(np.arange(h)[:, None] - shift[None, :], 0, h - 1)
    return mask[rows, np.arange(w)[None, :]]


def _paper(
    h: int, w: int, rng: random.Random, nrng: np.random.Generator, scale: float
) -> np.ndarray:
    """Paper: a tone, a gentle gradient, grain, and sometimes ruled lines or a grid (its
    step in pixels of the drawn glyphs, times scale)."""
    tone = rng.uniform(150, 250)
    grad = np.linspace(0, rng.uniform(-20, 20), w)[None, :]
    grain = nrng.normal(0, rng.uniform(0, 6), (h, w))
    paper = tone + grad + grain
    rule = rng.random()
    if rule < 0.45:
        darkness = rng.uniform(20, 60) * min(1.0, scale)  # a thin line, seen at this scale
        y0 = int(h * rng.uniform(0.62, 0.9))
        paper[max(0, y0 - 1) : y0 + rng.randint(0, 1), :] -= darkness
        if rule < 0.15:
            step = max(4, round(rng.randint(14, 30) * scale))
            paper[:, rng.randint(0, step) :: step] -= darkness * 0.7
            paper[y0 % step :: step, :] -= darkness * 0.7
    return paper


def render_line(text: str, font_name: str, rng: random.Random, height: int = 64) -> Image.Image:
    """One text line as a grayscale scan of handwriting: glyph jitter, slant, drift, stroke
    width, ink pressure, paper, rules, blur, noise, JPEG and contrast, all drawn from rng."""
    return scan(_draw_glyphs(text, font_name, rng), rng, height)


def scan(mask: Image.Image, rng: random.Random, height: int = 64) -> Image.Image:
    """An ink mask (255 = ink) as a grayscale scan at the height: slant, rotation, margins,
    drift, stroke width, ink pressure, paper, rules, blur, noise, JPEG and contrast. Shared
    by font-rendered lines and pen trajectories (hwr.embedded.unipen)."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    bbox = mask.getbbox() or (0, 0, 1, 1)
    mask = mask.crop(bbox)
    slant = rng.uniform(-0.35, 0.25)
    pad = int(abs(slant) * mask.height) + 2
    mask = mask.crop((-pad, 0, mask.width + pad, mask.height)).transform(
        (mask.width + 2 * pad, mask.height),
        Image.AFFINE,
        (1, slant, -slant * mask.height if slant > 0 else 0, 0, 1, 0),
        resample=Image.BILINEAR,
    )
    if rng.random() < 0.3:  # a broader pen
        mask = mask.filter(ImageFilter.MaxFilter(3))
    mask = mask.rotate(rng.gauss(0, 0.8), resample=Image.BILINEAR, expand=True)
    margin = [rng.randint(2, 16) for _ in range(4)]
    mask = mask.crop((-margin[0], -margin[1], mask.width + margin[2], mask.height + margin[3]))
    # Paper and ink are made at the output height: the same look, fewer pixels to make.
    scale = height / mask.height
    mask = mask.resize((max(1, round(mask.width * scale)), height), Image.BILINEAR)
    ink = _wave(np.asarray(mask, dtype=np.float32) / 255, rng, scale)
    h, w = ink.shape
    paper = _paper(h, w, rng, nrng, scale)
    # Pressure: ink darkness varies slowly along the line.
    level = rng.uniform(0.5, 1.0)
    pressure = np.clip(
        level
        + np.cumsum(nrng.normal(0, 0.01 / scale**0.5, w))[None, :]
        + nrng.normal(0, 0.05, (h, w)),
        0.6,
        1,
    )
    ink_tone = rng.uniform(0, 70)
    img = paper - (paper - ink_tone) * ink * pressure
    if rng.random() < 0.3:
        lo, hi = rng.uniform(0, 60), rng.uniform(200, 255)
        img = lo + (hi - lo) * img / 255
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * scale))
    if rng.random() < 0.4:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(30, 90))
        img = Image.open(buf).convert("L")
    return img


# Faker's locales for rendered text, by language (hwr.embedded.tiny.LANGUAGES).
LOCALES = {"fr": "fr_FR", "en": "en_US"}


class TextSource:
    """Lines of real-looking notes, each in French or English (half and half) and said which:
    given sentences of that language (e.g. transcriptions) plus Faker's sentences, names,
    addresses, dates, numbers, cut to 1-80 chars."""

    def __init__(self, sentences: Mapping[str, Sequence[str]] | None = None, seed: int = 0):
        self.sentences = {
            language: [s for s in texts if s.strip()]
            for language, texts in (sentences or {}).items()
        }
        self.rng = random.Random(seed)
        self.fakers = {language: Faker(locale) for language, locale in LOCALES.items()}
        for i, f in enumerate(self.fakers.values()):
            f.seed_instance(seed * 10 + i)

    @staticmethod
    def _when(f: Faker) -> datetime:
        # Fixed bounds: Faker's default range ends "now", which would change the lines.
        return f.date_time_between(datetime(1900, 1, 1), datetime(2030, 12, 31))

    def _fake(self, language: str) -> str:
        f, r = self.fakers[language], self.rng.random()
        if r < 0.45:
            return f.sentence(nb_words=self.rng.randint(3, 14))
        if r < 0.55:
            return f.address().replace("\n", ", ")
        if r < 0.65:
            pattern = self.rng.choice(["%d/%m/%Y", "%Y-%m-%d"])
            return f"{f.name()}, {self._when(f).strftime(pattern)}"
        if r < 0.72:
            price = f"{self.rng.randint(1, 9999)},{self.rng.randint(0, 99):02d}"
            return f"{f.catch_phrase()} : {price} €"
        if r < 0.8:
            return f"{f.phone_number()} ({f.first_name()})"
        if r < 0.9:
            return f"{self._when(f).strftime('%H:%M')} {f.sentence(nb_words=5)}"
        if r < 0.95 and language == "en":  # English notes' signs: fractions, pounds, quotes
            n, k = self.rng.randint(1, 99), self.rng.randint(2, 12)
            return self.rng.choice(
                [
                    f"{n}½ lb of {f.word()}, £{n}.{k:02d}",
                    f"§ {n}: ‘{f.word()}’ & {f.word()}",
                    f"{n} × {k} @ {k} pm, #{n}",
                    f"{n}% of the {f.word()} (¼ or ¾?)",
                ]
            )
        if language == "fr":
            return f"{f.word().capitalize()} ! {f.sentence(nb_words=4)} ? « {f.word()} »"
        return f"{f.word().capitalize()}! {f.sentence(nb_words=4)}? “{f.word()}”"

    def line(self, max_chars: int = 80) -> tuple[str, str]:
        """One line, at most max_chars long, cut at a word boundary like a wrapped note;
        and its language."""
        language = self.rng.choice(list(self.fakers))
        real = self.sentences.get(language)
        use_real = real and self.rng.random() < 0.5
        text = self.rng.choice(real) if use_real else self._fake(language)
        while len(text) < max_chars and self.rng.random() < 0.5:
            text += " " + (self.rng.choice(real) if use_real else self._fake(language))
        words = text.split()
        start = self.rng.randrange(len(words)) if self.rng.random() < 0.3 else 0
        length = min(max_chars, self.rng.choice([self.rng.randint(1, 20), 80, 80]))
        out = ""
        for word in words[start:]:
            if out and len(out) + 1 + len(word) > length:
                break
            out = f"{out} {word}" if out else word
        return (out or words[start])[:max_chars], language


def synthetic_lines(
    n: int, fonts: Sequence[str] = TRAIN_FONTS, seed: int = 0
) -> Iterator[tuple[Image.Image, str, str]]:
    """n (image, text, font) triples; the same seed gives the same lines."""
    texts = TextSource(seed=seed)
    rng = random.Random(seed)
    for _ in range(n):
        text, _ = texts.line()
        font = rng.choice(fonts)
        yield render_line(text, font, rng), text, font


def write_lines(
    out_dir: Path,
    lines: Iterable[tuple[Image.Image, str, str]],
    total: int | None = None,
    lines_per_page: int = 8,
) -> Path:
    """Save (image, text, font) triples as out_dir/images/*.png and out_dir/lines.csv
    (with a page column: lines_per_page lines to a page)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text", "page", "font"])
    for i, (img, text, font) in enumerate(tqdm(lines, total=total, desc="rendering", unit="line")):
        name = f"images/line_{i:05d}.png"
        img.save(out_dir / name)
        writer.writerow([name, text, f"page_{i // lines_per_page + 1:02d}", font])
    return write_text(out_dir / "lines.csv", buf.getvalue())


def write_sample(
    out_dir: Path,
    texts: Sequence[str],
    font: str = "caveat",
    seed: int = 0,
    lines_per_page: int = 8,
) -> Path:
    """Render texts in one font (one "writer"), as out_dir/images/*.png + lines.csv."""
    rng = random.Random(seed)
    lines = ((render_line(text, font, rng), text, font) for text in texts)
    return write_lines(out_dir, lines, len(texts), lines_per_page)


def contact_sheet(images: Sequence[Image.Image], path: Path, width: int = 1200) -> Path:
    """Stack line images into one PNG, to look at them next to real scans."""
    rows = [im.resize((min(width, im.width), im.height)) for im in images]
    sheet = Image.new("L", (width, sum(r.height for r in rows)), 255)
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(path)
    return path


CHUNK = 100


def _render_chunk(job: tuple[int, tuple[str, ...], int]) -> list[tuple[Image.Image, str, str]]:
    n, fonts, seed = job
    return list(synthetic_lines(n, fonts, seed=seed))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("line_data"), help="output folder")
    parser.add_argument(
        "--lines",
        type=int,
        default=0,
        help="render this many generated lines (default: the shipped sample's 40 notes)",
    )
    parser.add_argument("--fonts", nargs="+", default=None, help="fontpkg font families")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    parser.add_argument("--sheet", type=Path, help="also save the first 24 lines as one PNG")
    parser.add_argument(
        "--get-fonts", type=Path, metavar="DIR", help="fetch FONTSOURCE's fonts with npm into DIR"
    )
    args = parser.parse_args(argv)
    if args.get_fonts:
        got = get_fonts(args.get_fonts)
        print(f"{len(got)} of {len(FONTSOURCE)} families in {args.get_fonts}")
        return
    if args.lines:
        # Fixed-size chunks, each with its own seed: the same lines for any --workers.
        fonts = tuple(args.fonts or TRAIN_FONTS)
        chunks = [
            (min(CHUNK, args.lines - start), fonts, args.seed * 1_000_003 + start // CHUNK)
            for start in range(0, args.lines, CHUNK)
        ]
        with multiprocessing.Pool(args.workers) as pool:
            lines = itertools.chain.from_iterable(pool.imap(_render_chunk, chunks))
            csv_path = write_lines(args.out, lines, args.lines)
    else:
        font = (args.fonts or ["caveat"])[0]
        csv_path = write_sample(args.out, SAMPLE_TEXT.splitlines(), font, args.seed)
    if args.sheet:
        with csv_path.open(encoding="utf-8", newline="") as f:
            names = [row["file_name"] for row in itertools.islice(csv.DictReader(f), 24)]
        images = []
        for name in names:
            with Image.open(args.out / name) as im:
                images.append(im.copy())
        contact_sheet(images, args.sheet)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
