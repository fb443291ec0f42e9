"""What a run leaves for people: metrics.json, predictions.csv, a comparison figure, examples.

Files are written atomically (temp file, then rename), so an interrupted run never
leaves a half-written report behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from hwr.images import open_rgb
from hwr.metrics import METRICS

if TYPE_CHECKING:
    from hwr.data import Line

# name -> {"metrics": {...}, "predictions": {line index: (text, cer)}}
Results = Mapping[str, Mapping]


def umask() -> int:
    """The process's umask (os.umask only reads it by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`.

    The file gets the mode a plain open() would (the umask's), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: object) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_skipped(folder: Path, skipped: Mapping[str, str]) -> str:
    """folder/skipped.csv: each input that gave nothing (source, reason); returns the same
    list as lines to show the user."""
    buf = io.StringIO()
    csv.writer(buf).writerows([("source", "reason"), *skipped.items()])
    write_text(Path(folder) / "skipped.csv", buf.getvalue())
    return "\n".join(f"  {source}: {reason}" for source, reason in skipped.items())


def write_predictions(path: Path, lines: Sequence[Line], results: Results) -> Path:
    """One row per evaluated line: reference, then each model's reading and its CER."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file_name", "reference"] + [c for n in results for c in (n, f"{n}_cer")])
    for i, line in enumerate(lines):
        row = [line.file_name, line.text]
        for result in results.values():
            text, cer = result["predictions"].get(i, ("", float("nan")))
            row += [text, f"{cer:.4f}"]
        writer.writerow(row)
    return write_text(path, buf.getvalue())


def format_table(results: Results) -> str:
    """A Markdown table of each model's scores."""
    head = "| model | " + " | ".join(METRICS) + " | lines |"
    rows = [head, "|" + "---|" * (len(METRICS) + 2)]
    for name, result in results.items():
        m = result["metrics"]
        cells = " | ".join(f"{m[k]:.4f}" for k in METRICS)
        rows.append(f"| {name} | {cells} | {m['n_lines']} |")
    return "\n".join(rows)


def plot_comparison(path: Path, results: Results) -> Path:
    """Grouped bars, one group per metric, one bar per model, values written on top."""
    names = list(results)
    counts = {name: results[name]["metrics"]["n_lines"] for name in names}
    same = len(set(counts.values())) == 1  # not so when a model's unseen lines are apart
    fig = Figure(figsize=(2.2 * len(METRICS) + 1, 4))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = [results[name]["metrics"][k] for k in METRICS]
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(METRICS))]
        label = name if same else f"{name}, {counts[name]} lines"
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(METRICS)))
    ax.set_xticklabels(
        ["CER (lower is better)", "WER (lower is better)", "line accuracy", "char similarity"]
    )
    on = f" on {counts[names[0]]} lines" if same else ""
    ax.set_title(f"{' vs '.join(names)}{on}")
    ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    return _save_figure(path, fig)


def plot_examples(path: Path, lines: Sequence[Line], results: Results, n: int = 6) -> Path:
    """Line images with the reference and each model's reading below, worst lines first."""
    last = list(results.values())[-1]["predictions"]
    order = sorted(range(len(lines)), key=lambda i: -last.get(i, ("", 0.0))[1])[:n]
    fig = Figure(figsize=(10, 1.9 * len(order)))
    axes = fig.subplots(len(order), 1, squeeze=False)
    for ax, i in zip(axes[:, 0], order, strict=True):
        ax.imshow(open_rgb(lines[i].image).convert("L"), cmap="gray", vmin=0, vmax=255)
        ax.set_axis_off()
        caption = [f"reference: {lines[i].text}"]
        for name, result in results.items():
            text, cer = result["predictions"].get(i, ("", float("nan")))
            caption.append(f"{name} (CER {cer:.2f}): {text}")
        ax.set_title("\n".join(caption), fontsize=8, loc="left")
    fig.tight_layout()
    return _save_figure(path, fig)


def plot_learning_curve(path: Path, points: Sequence[Mapping]) -> Path:
    """Tuned CER against training lines (log scale; min-max over runs), base CER as a line."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    xs = [p["lines"] for p in points]
    means = [p["tuned_cer"] for p in points]
    spread = [[m - p["min"] for m, p in zip(means, points, strict=True)]]
    spread.append([p["max"] - m for m, p in zip(means, points, strict=True)])
    ax.errorbar(xs, means, yerr=spread, marker="o", capsize=4, label="tuned (mean, min-max)")
    for x, m in zip(xs, means, strict=True):
        ax.annotate(f"{m:.3f}", (x, m), textcoords="offset points", xytext=(6, 6), ha="left")
    lm = [p["lm_cer"] for p in points if p.get("lm_cer") is not None]
    if len(lm) == len(points):
        ax.plot(xs, lm, marker="s", label="tuned + language model of the training text (mean)")
        for x, m in zip(xs, lm, strict=True):
            ax.annotate(f"{m:.3f}", (x, m), textcoords="offset points", xytext=(6, -12))
    base = sum(p["base_cer"] for p in points) / len(points)
    ax.axhline(base, color="grey", linestyle="--", label=f"base {base:.3f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("training lines")
    ax.set_ylabel("CER on held-out lines (lower is better)")
    ax.set_ylim(0, max(base, *means, *lm) * 1.15)
    ax.set_title("How many lines to label: CER against training lines")
    ax.legend()
    fig.tight_layout()
    return _save_figure(path, fig)


def _save_figure(path: Path, fig: Figure) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))


def write_report(run_dir: Path, lines: Sequence[Line], results: Results) -> str:
    """predictions.csv, comparison.png and examples.png in run_dir; returns the score table."""
    run_dir = Path(run_dir)
    write_predictions(run_dir / "predictions.csv", lines, results)
    plot_comparison(run_dir / "comparison.png", results)
    plot_examples(run_dir / "examples.png", lines, results)
    return format_table(results)
