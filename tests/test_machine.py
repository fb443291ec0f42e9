"""Precision and threads that fit the machine: bf16 only where it is native, and the cores
shared among the hwr processes running on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwr import machine
from hwr.machine import CoreShare, reading_dtype, resolve_precision, trainer_precision


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "chosen"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_instructions(
    monkeypatch, compose_cfg, caplog, avx512_bf16: bool, amx: bool, chosen: str
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cfg = compose_cfg("train", ["trainer.accelerator=cpu"])
    assert cfg.trainer.precision == "auto"  # the default
    with caplog.at_level("INFO", logger="hwr.machine"):
        assert trainer_precision(cfg.trainer) == chosen
    assert f"trainer.precision=auto: {chosen}, since this CPU has" in caplog.text
    predict = torch.bfloat16 if chosen == "bf16-mixed" else torch.float32
    assert reading_dtype("auto", "cpu") == predict
    # A precision the user names is kept, whatever the CPU.
    assert trainer_precision(compose_cfg("train", ["trainer.precision=32-true"]).trainer) == (
        "32-true"
    )


def test_auto_precision_on_a_gpu_asks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision("auto", "cuda", bf16="b", fp32="f", name="p") == "f"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "cuda:1", bf16="b", fp32="f", name="p") == "b"


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_hwr_processes_share_the_cores_and_take_them_back(tmp_path: Path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(machine, "RECHECK", 0.0)
    share = CoreShare(tmp_path)
    share.rebalance()  # alone: what torch takes by itself, unchanged
    assert share.cores == threads == torch.get_num_threads()
    share.cores = 4
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert share.running() == 1
        (tmp_path / str(other.pid)).write_text(start_time(other.pid))
        # A file left by a process that ended, and one whose pid the system gave to another
        # process since (its start time differs): neither is counted, both are removed.
        (tmp_path / "999999999").write_text("1")
        (tmp_path / str(os.getppid())).write_text("not its start time")
        assert share.running() == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [str(os.getpid()), str(other.pid)]
        )
        share.rebalance()
        assert torch.get_num_threads() == 2  # 4 cores, 2 processes
        other.kill()
        other.wait()
        share.rebalance()
        assert torch.get_num_threads() == 4 and share.running() == 1
    finally:
        other.kill()
        torch.set_num_threads(threads)


def test_only_entry_points_share_so_a_benchmarks_thread_count_stays(monkeypatch):
    monkeypatch.setattr(machine, "_share", None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        machine.rebalance()  # no entry point registered this process
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
