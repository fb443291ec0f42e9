"""Handwriting-style line images rendered from text, in the project's CSV format.

Makes the shipped `line_data/` sample, so a first run works on a fresh machine:

    python -m hwr.synth --out line_data
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from collections.abc import Sequence
from pathlib import Path

import fontpkg
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from hwr.report import write_text

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


def render_line(text: str, font_path: Path, rng: random.Random, height: int = 64) -> Image.Image:
    """One line of text in a handwriting font, with a little of a real page's variation."""
    font = ImageFont.truetype(str(font_path), size=rng.randint(36, 44))
    if font.get_variation_axes():
        font.set_variation_by_axes([rng.uniform(400, 650)])
    left, top, right, bottom = font.getbbox(text)
    pad = 12
    paper, ink = rng.randint(225, 250), rng.randint(15, 80)
    img = Image.new("L", (right - left + 2 * pad, max(bottom - top, 1) + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
    img = img.rotate(rng.uniform(-1.5, 1.5), resample=Image.BICUBIC, expand=True, fillcolor=paper)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
    scale = height / img.height
    return img.resize((max(1, round(img.width * scale)), height), Image.BICUBIC)


def write_sample(
    out_dir: Path,
    texts: Sequence[str],
    font: str = "caveat",
    seed: int = 0,
    lines_per_page: int = 8,
) -> Path:
    """Render each text as a PNG under out_dir/images and write out_dir/lines.csv."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    font_path = fontpkg.path(font)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "text", "page"])
    for i, text in enumerate(tqdm(texts, desc="rendering", unit="line")):
        name = f"images/line_{i:04d}.png"
        render_line(text, font_path, rng).save(out_dir / name)
        writer.writerow([name, text, f"page_{i // lines_per_page + 1:02d}"])
    return write_text(out_dir / "lines.csv", buf.getvalue())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("line_data"), help="output folder")
    parser.add_argument("--font", default="caveat", help="a fontpkg font family installed")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    csv_path = write_sample(args.out, SAMPLE_TEXT.splitlines(), args.font, args.seed)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
