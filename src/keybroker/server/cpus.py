"""How many CPUs this process may use: the affinity mask and the cgroup v2 CPU quota.

``[server] processes = "auto"`` (the default) starts one worker per CPU this count gives. In a
container, ``os.cpu_count()`` is the host's CPU count; the container's limit is its cgroup's
``cpu.max`` (``"<quota> <period>"`` in µs, or ``"max <period>"`` for none), which Kubernetes sets
from ``resources.limits.cpu`` and systemd from ``CPUQuota=``. Every cgroup from the process's own
up to the root may carry a quota; the smallest counts. A fractional quota is rounded up (2.5 CPUs
start 3 workers: none of the quota is left idle). cgroup v1 is not read: there the affinity mask
alone counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def cgroup_quota(
    cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The cgroup v2 CPU quota in CPUs (the smallest along the hierarchy), or None if unlimited
    or unknown (cgroup v1, no cgroup file system, unreadable files)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    own = next((line[3:] for line in lines if line.startswith("0::")), None)
    if own is None:  # cgroup v1 only
        return None
    directory = cgroup_root / own.strip().lstrip("/")
    quotas: list[float] = []
    while True:
        quota = _read_cpu_max(directory / "cpu.max")
        if quota is not None:
            quotas.append(quota)
        if directory == cgroup_root or cgroup_root not in directory.parents:
            break
        directory = directory.parent
    return min(quotas) if quotas else None


def _read_cpu_max(path: Path) -> float | None:
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def affinity_count() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where there is no mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def available_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    proc_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """min(affinity mask, cgroup v2 quota rounded up), at least 1."""
    count = affinity_count() if affinity is None else affinity
    quota = cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
