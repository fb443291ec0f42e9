"""Two hwr processes on one machine: the quickstart alone, then beside another hwr process
that reads lines without pause (as the labelling page or predict.py do), with the cores
shared among them (the default) and not (OMP_NUM_THREADS set to every core in both, which
turns sharing off: torch's own default, and hwr's before it shared them).

    python bench/share.py [--cap 400] [--out bench/results]

Prints a table and writes bench/results/share.md. A run not done after --cap seconds is
stopped and shown as over it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def neighbour(count_file: Path) -> None:
    """Read the shipped sample's lines with the embedded model over and over, as a hwr
    process does; write how many lines were read so far into `count_file`."""
    from hwr.machine import share_cores

    os.environ["TQDM_DISABLE"] = "1"  # its progress bars would bury the table
    share_cores()  # as every entry point does, before torch loads
    from hwr.data import read_lines
    from hwr.decoding import read_images
    from hwr.images import open_rgb
    from hwr.model import load_pretrained

    model, processor = load_pretrained("embedded")
    model.eval()
    images = [open_rgb(line.image) for line in read_lines(REPO / "line_data" / "lines.csv")]
    done = 0
    while True:
        read_images(model, processor, images, batch_size=8)
        done += len(images)
        part = count_file.with_suffix(".part")
        part.write_text(f"{time.monotonic()} {done}")
        os.replace(part, count_file)  # never read half-written


def quickstart(env: dict, cap: float, out: Path) -> float | None:
    """Seconds the README's quickstart takes (None: stopped at `cap`)."""
    began = time.monotonic()
    try:
        subprocess.run(
            [sys.executable, "train.py", "experiment=quickstart", f"hydra.run.dir={out}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            timeout=cap,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - began


@contextlib.contextmanager
def reading(env: dict, count: Path) -> Iterator[Callable[[], float]]:
    """The neighbour process, started and reading; yields a function that says how many
    lines per second it has read since then."""
    proc = subprocess.Popen([sys.executable, __file__, "--neighbour", str(count)], env=env)
    try:
        while not count.exists():  # loaded and reading
            if proc.poll() is not None:
                raise SystemExit("the reading process stopped: see its output above")
            time.sleep(1)
        since = list(map(float, count.read_text().split()))

        def rate() -> float:
            at, done = map(float, count.read_text().split())
            return (done - since[1]) / (at - since[0])

        yield rate
    finally:
        proc.kill()
        proc.wait()


def reading_alone(count: Path, seconds: float) -> float:
    with reading(dict(os.environ), count) as rate:
        time.sleep(seconds)
        return rate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap", type=float, default=400.0, help="seconds before a run stops")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    from hwr.machine import bf16_native, cpu_name

    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quiet = quickstart(dict(os.environ), args.cap, tmp / "alone")
        if quiet is None:
            raise SystemExit(f"the quickstart alone took over --cap {args.cap:.0f} s")
        rows.append(("alone", quiet, reading_alone(tmp / "count", 30.0)))
        for shared in (True, False):
            env = dict(os.environ)
            if not shared:
                env["OMP_NUM_THREADS"] = str(cores)
            with reading(env, tmp / f"count-{shared}") as rate:
                seconds = quickstart(env, args.cap, tmp / f"beside-{shared}")
                label = "shared (default)" if shared else f"not shared (OMP_NUM_THREADS={cores})"
                rows.append((f"beside a reading hwr process, cores {label}", seconds, rate()))
    lines = [
        f"{cpu_name()}, {cores} cores: {bf16_native('cpu')[1]}",
        "",
        "| quickstart | seconds | x alone | the reading process, lines/s |",
        "|---|---|---|---|",
    ]
    for name, seconds, rate in rows:
        if seconds is None:
            took, ratio = f"> {args.cap:.0f} (stopped)", f"> {args.cap / quiet:.1f}"
        else:
            took, ratio = f"{seconds:.0f}", f"{seconds / quiet:.2f}"
        lines.append(f"| {name} | {took} | {ratio} | {rate:.1f} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "share.md").write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--neighbour"]:
        neighbour(Path(sys.argv[2]))
    else:
        main()
