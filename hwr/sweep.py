"""A summary of every job of a multirun sweep, rewritten as each job ends.

Hydra skips `on_multirun_end` when a job fails, so the summary is rebuilt from the job
folders after every job: a failed job shows up as failed and never hides the others.
A sweep over `data.train_lines` also gets its learning curve: tuned CER against the
number of training lines, from the base model's CER.
"""

from __future__ import annotations

import csv
import io
import json
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from hwr.errors import find_user_error
from hwr.lm import LM_NAME
from hwr.metrics import METRICS
from hwr.report import plot_learning_curve, write_text

COLUMNS = (
    "job",
    "status",
    "overrides",
    *(f"{w}_{m}" for w in ("base", "tuned") for m in METRICS),
    "tuned_lm_cer",
)
WITH_LM = f"tuned + {LM_NAME}"  # the tuned model read with the language model of its text


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder, sorted by tuned CER; failed jobs last, with their error."""
    rows = []
    for job in sorted(p for p in Path(sweep_dir).iterdir() if (p / ".hydra").is_dir()):
        overrides = " ".join(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        row: dict[str, Any] = {"job": job.name, "overrides": overrides}
        if (job / "metrics.json").is_file():
            metrics = json.loads((job / "metrics.json").read_text(encoding="utf-8"))
            row["status"] = "ok"
            for which in ("base", "tuned"):
                row |= {f"{which}_{m}": metrics[which][m] for m in METRICS}
            if WITH_LM in metrics:
                row["tuned_lm_cer"] = metrics[WITH_LM]["cer"]
        elif (job / "error.txt").is_file():
            lines = (job / "error.txt").read_text(encoding="utf-8").strip().splitlines()
            row["status"] = f"failed: {lines[-1] if lines else 'see error.txt'}"
        else:
            row["status"] = "running or killed"
        rows.append(row)
    return sorted(rows, key=lambda r: (r["status"] != "ok", r.get("tuned_cer", 0.0)))


def write_summary(sweep_dir: Path) -> None:
    rows = summarize(sweep_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(sweep_dir) / "summary.csv", buf.getvalue())

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    write_text(Path(sweep_dir) / "summary.md", "\n".join(md) + "\n")
    points = learning_curve(sweep_dir)
    if points:
        write_text(Path(sweep_dir) / "learning_curve.md", curve_table(points) + "\n")
        plot_learning_curve(Path(sweep_dir) / "learning_curve.png", points)


def learning_curve(sweep_dir: Path) -> list[dict[str, Any]]:
    """Finished jobs of a sweep over data.train_lines, grouped by how many lines trained.

    Each point: lines, runs (subset orders), tuned CER mean/min/max, base CER (the same
    held-out lines for every job), the change against it, the characters a person
    corrects per line in the base and the tuned reading (as the labelling page pre-fills),
    and the tuned CER read with the language model of the training text (None without).
    """
    by_size: dict[int, list[tuple]] = {}
    for job in sorted(p for p in Path(sweep_dir).iterdir() if (p / "metrics.json").is_file()):
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        if not any(str(o).startswith("data.train_lines=") for o in overrides):
            continue
        metrics = json.loads((job / "metrics.json").read_text(encoding="utf-8"))
        if "base" not in metrics:
            continue
        with (job / "predictions.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        # A line's edits are its CER (in predictions.csv) times its length: no new alignment.
        fixes = [
            sum(round(float(r[f"{w}_cer"]) * max(len(r["reference"]), 1)) for r in rows) / len(rows)
            for w in ("base", "tuned")
        ]
        n = metrics["settings"]["n_train"]
        with_lm = metrics[WITH_LM]["cer"] if WITH_LM in metrics else None
        by_size.setdefault(n, []).append(
            (metrics["base"]["cer"], metrics["tuned"]["cer"], *fixes, with_lm)
        )
    points = []
    for n, runs in sorted(by_size.items()):
        tuned = [r[1] for r in runs]
        base = sum(r[0] for r in runs) / len(runs)
        mean = sum(tuned) / len(tuned)
        with_lm = [r[4] for r in runs if r[4] is not None]
        points.append(
            {
                "lines": n,
                "runs": len(runs),
                "tuned_cer": mean,
                "min": min(tuned),
                "max": max(tuned),
                "base_cer": base,
                "change": (mean - base) / base if base else 0.0,
                "base_fixes": sum(r[2] for r in runs) / len(runs),
                "tuned_fixes": sum(r[3] for r in runs) / len(runs),
                "lm_cer": sum(with_lm) / len(with_lm) if len(with_lm) == len(runs) else None,
            }
        )
    return points


def curve_table(points: list[dict[str, Any]]) -> str:
    rows = [
        "| training lines | runs | tuned CER (mean) | min | max | base CER | change "
        "| characters to fix per line, base → tuned | tuned + LM CER (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        lm = "" if p["lm_cer"] is None else f"{p['lm_cer']:.4f}"
        rows.append(
            f"| {p['lines']} | {p['runs']} | {p['tuned_cer']:.4f} | {p['min']:.4f} | "
            f"{p['max']:.4f} | {p['base_cer']:.4f} | {100 * p['change']:+.1f}% "
            f"| {p['base_fixes']:.1f} → {p['tuned_fixes']:.1f} | {lm} |"
        )
    return "\n".join(rows)


class SweepSummary(Callback):
    """Hydra callback: after each multirun job, record its error (if any) and the summary.

    Jobs of a parallel launcher may rewrite it at the same moment; the end of the sweep
    (when no job failed) writes it once more from every job's folder.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(Path(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or config.hydra.mode.name != "MULTIRUN":
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            # The traceback, then the message a user acts on (Hydra's instantiate wraps it).
            reason = str(find_user_error(error) or error).strip().splitlines() or ["(no message)"]
            text = "".join(traceback.format_exception(error)) + "\n" + reason[0] + "\n"
            write_text(job_dir / "error.txt", text)
        write_summary(Path(config.hydra.sweep.dir))
