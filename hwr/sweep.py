"""A summary of every job of a multirun sweep, rewritten as each job ends.

Hydra skips `on_multirun_end` when a job fails, so the summary is rebuilt from the job
folders after every job: a failed job shows up as failed and never hides the others.
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
from hwr.metrics import METRICS
from hwr.report import write_text

COLUMNS = ("job", "status", "overrides", *(f"{w}_{m}" for w in ("base", "tuned") for m in METRICS))


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
