"""CPU time per process group from /proc, to charge each cell's requests with the CPU they cost.

On a 2-core machine the servers, the load generator and anything else running compete for the
same cores. Per cell we record the CPU seconds of each of our process groups (Triton with its
python-backend stubs, the mesh, MLServer, the clients) and of the whole machine; the difference
("foreign") shows when something outside the benchmark disturbed a cell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read_stat(pid: str) -> tuple[int, int] | None:
    """(process group, utime + stime in ticks) of one process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after its closing ')'.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    return int(fields[2]), int(fields[11]) + int(fields[12])


def _system_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already part of user
    return total - idle, total


@dataclass
class CpuSnapshot:
    groups: dict[str, int] = field(default_factory=dict)
    system_busy: int = 0
    system_total: int = 0


class CpuMeter:
    """Snapshots of CPU ticks for named process groups (pgid) and single processes (pid)."""

    def __init__(self) -> None:
        self.process_groups: dict[str, int] = {}
        self.processes: dict[str, list[int]] = {}

    def snapshot(self) -> CpuSnapshot:
        by_group: dict[int, int] = {}
        by_pid: dict[int, int] = {}
        wanted_pids = {pid for pids in self.processes.values() for pid in pids}
        wanted_groups = set(self.process_groups.values())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            stat = _read_stat(entry)
            if stat is None:
                continue
            pgrp, ticks = stat
            if pgrp in wanted_groups:
                by_group[pgrp] = by_group.get(pgrp, 0) + ticks
            if int(entry) in wanted_pids:
                by_pid[int(entry)] = ticks
        snapshot = CpuSnapshot()
        for name, pgid in self.process_groups.items():
            snapshot.groups[name] = by_group.get(pgid, 0)
        for name, pids in self.processes.items():
            snapshot.groups[name] = sum(by_pid.get(pid, 0) for pid in pids)
        snapshot.system_busy, snapshot.system_total = _system_ticks()
        return snapshot

    @staticmethod
    def delta(before: CpuSnapshot, after: CpuSnapshot, wall_s: float) -> dict[str, float]:
        """CPU seconds per group, plus the machine's busy seconds and what none of ours used."""
        out = {name: (after.groups.get(name, 0) - ticks) / CLOCK_TICKS for name, ticks in before.groups.items()}
        busy = (after.system_busy - before.system_busy) / CLOCK_TICKS
        out["machine_busy"] = busy
        out["foreign"] = max(0.0, busy - sum(v for k, v in out.items() if k != "machine_busy"))
        out["wall"] = wall_s
        return out
