"""What this machine runs well: bf16 or float32, and how many threads each hwr process takes.

bf16 pays only where the hardware computes in it (CPUs with AVX-512 BF16 or AMX, GPUs of
Ampere and later); elsewhere it is emulated and slower than float32, so `auto` decides.

torch starts one OpenMP thread per core in every process. Two of them on one machine (a
training run beside the labelling page, say) then wait at every parallel step for a thread
the other process holds the core of: 8-13x slower each. So each hwr process registers
itself, takes an equal share of the cores, and takes them back as the others end.
"""

from __future__ import annotations

import atexit
import getpass
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

# Where each running hwr process leaves a file named by its pid.
REGISTRY = Path(tempfile.gettempdir()) / f"hwr-processes-{getpass.getuser()}"
# How often a process looks again at how many others run (seconds).
RECHECK = 2.0


def bf16_native(device: str) -> tuple[bool, str]:
    """Whether `device` ("cpu", "cuda", "cuda:1") computes in bf16 natively, and why."""
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes in bf16"
        return False, f"{name} does not compute in bf16 (it would be emulated)"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return True, "this CPU has bf16 instructions (AVX-512 BF16 or AMX)"
    return False, (
        "this CPU has no bf16 instructions (AVX-512 BF16 or AMX): bf16 would be emulated, "
        "slower than float32"
    )


def cpu_name() -> str:
    """The processor's model name (figures measured here depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_device(accelerator: str = "auto") -> str:
    """The device Lightning's `accelerator` (auto, cpu, gpu, cuda) trains on."""
    import torch

    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_precision(setting: str, device: str, *, bf16: str, fp32: str, name: str) -> str:
    """`setting` as given, or for "auto" `bf16` where `device` computes in it, else `fp32`;
    the log says which and why (`name` is the setting, as the user writes it)."""
    if str(setting) != "auto":
        return setting
    native, why = bf16_native(device)
    chosen = bf16 if native else fp32
    log.info("%s=auto: %s, since %s", name, chosen, why)
    return chosen


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """The Trainer's precision: `trainer.precision`, with auto resolved for its accelerator."""
    return resolve_precision(
        trainer_cfg.precision,
        default_device(trainer_cfg.get("accelerator", "auto")),
        bf16="bf16-mixed",
        fp32="32-true",
        name="trainer.precision",
    )


def reading_dtype(setting: str, device: str):
    """The dtype predict.py reads in: `precision` (auto, fp32, bf16) resolved for `device`."""
    import torch

    chosen = resolve_precision(setting, device, bf16="bf16", fp32="fp32", name="precision")
    return torch.bfloat16 if chosen == "bf16" else torch.float32


def _started(pid: int) -> str:
    """When process `pid` started (Linux's clock ticks since boot; "" where /proc is
    missing): a pid the system gave again to another process is not taken for the first."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


class CoreShare:
    """This process's share of the cores among the hwr processes running on this machine."""

    def __init__(self, registry: Path = REGISTRY) -> None:
        self.registry = registry
        # What torch takes alone (its threads at the first look: one per physical core it
        # may run on), shared out among the processes.
        self.cores: int | None = None
        self.checked = -RECHECK
        self.registry.mkdir(parents=True, exist_ok=True)
        self.mine = self.registry / str(os.getpid())
        self.mine.write_text(_started(os.getpid()))
        atexit.register(self.mine.unlink, missing_ok=True)

    def running(self) -> int:
        """How many hwr processes run (this one included); files of ended ones are removed."""
        count = 0
        for entry in self.registry.iterdir():
            try:
                pid = int(entry.name)
                os.kill(pid, 0)
                alive = entry.read_text() == _started(pid)
            except ProcessLookupError:
                alive = False
            except (ValueError, OSError):  # not ours, or gone meanwhile
                continue
            if alive:
                count += 1
            else:
                entry.unlink(missing_ok=True)
        return max(count, 1)

    def rebalance(self) -> None:
        """Take this process's share again, if the others changed (at most every RECHECK s)."""
        now = time.monotonic()
        if now - self.checked < RECHECK:
            return
        self.checked = now
        import torch

        if self.cores is None:
            self.cores = torch.get_num_threads()
        running = self.running()
        wanted = max(1, self.cores // running)
        if wanted != torch.get_num_threads():
            log.info(
                "%d hwr process(es) on %d cores: this one now uses %d thread(s)",
                running,
                self.cores,
                wanted,
            )
            torch.set_num_threads(wanted)


_share: CoreShare | None = None


def share_cores() -> None:
    """Called by each entry point before torch loads: join the hwr processes sharing the
    cores; `rebalance` takes the share. A thread count the user set (OMP_NUM_THREADS) is
    left as it is."""
    global _share
    if _share is not None or "OMP_NUM_THREADS" in os.environ:
        return
    # Waiting threads sleep instead of spinning on a core another process may need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _share = CoreShare()


def rebalance() -> None:
    """Between batches: take this process's share of the cores again (no-op unless
    `share_cores` ran, so a benchmark's or a test's own thread count stays)."""
    if _share is not None:
        _share.rebalance()
