"""CPU threads: a count that does not collapse when other work shares the CPU.

Two things make a CPU run many times slower on a busy machine: OpenMP worker threads that
spin-wait for each other (a spinning thread burns a core another process needs, and the step
waits for the slowest thread), and more threads than the cores this process may use
(hyperthreads, a CPU affinity mask, a container's CPU quota). So before torch is imported,
:func:`prepare_openmp` makes waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``), and
:func:`configure_cpu_threads` uses one thread per physical core this process may run on.
An explicit ``--threads N`` or ``OMP_NUM_THREADS`` always wins. Every command that trains
(``train``, ``demo``, ``app``, ``bench``) goes through here.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

_CPU_SYS = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def prepare_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin, unless the user chose; call before torch loads."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def allowed_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int], sys_root: Path = _CPU_SYS) -> int:
    """Distinct physical cores among ``cpus`` (hyperthread siblings count once)."""
    cores = set()
    for cpu in cpus:
        topo = sys_root / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: count the logical CPU
    return max(1, len(cores))


def cgroup_cpu_limit(cpu_max: Path = _CGROUP_CPU_MAX) -> int | None:
    """CPUs a container's quota allows (``docker --cpus 2`` -> 2), or None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_cpu_threads() -> int:
    """One thread per physical core this process may use, within a container's CPU quota."""
    n = physical_cores(allowed_cpus())
    limit = cgroup_cpu_limit()
    return min(n, limit) if limit else n


def configure_cpu_threads(requested: int | None = None, *, small_model: bool = False) -> int:
    """Set torch's CPU threads and return the count: ``requested`` (``--threads``) if given, else
    what ``OMP_NUM_THREADS`` says, else 1 for a tiny model (its operations are too small to
    split) or :func:`default_cpu_threads`."""
    import torch

    if requested is not None:
        if requested < 1:
            from lora_trainer.errors import ConfigError

            raise ConfigError(f"--threads: {requested} must be at least 1")
        torch.set_num_threads(requested)
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        pass  # the user's choice; torch read it at start-up
    else:
        torch.set_num_threads(1 if small_model else default_cpu_threads())
    return torch.get_num_threads()


def add_threads_argument(ap: argparse.ArgumentParser) -> None:
    """``--threads N`` for a command that computes on the CPU."""
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per physical core "
                         "this process may use; idle threads sleep rather than spin, so a busy machine "
                         "does not slow the run down many times)")
