"""A ``sovpack build`` run split into its phases: time and peak memory between the build's stage lines.

The build prints one ``sovpack build: <stage>`` line on stderr as each stage starts (reference, each target's
writing, calibration, quantization plan, parity, store + sign); a sampler reads the process's anonymous and
total resident memory every ``SAMPLE_S`` seconds and charges it to the phase under way.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import MIB

SAMPLE_S = 0.5


@dataclass
class Phase:
    name: str
    start: float
    end: float = 0.0
    peak_anon: int = 0
    peak_rss: int = 0
    start_anon: int | None = None  # the first sample: what the build holds as the phase begins
    cpu_start: float = 0.0  # the process's CPU seconds (every thread, user + system) as the phase began
    cpu_end: float = 0.0


@dataclass
class Run:
    returncode: int = 0
    wall: float = 0.0
    phases: list[Phase] = field(default_factory=list)
    peak_anon: int = 0
    peak_rss: int = 0
    tail: list[str] = field(default_factory=list)


def _memory(pid: int) -> tuple[int, int]:
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return anon, rss


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of the process so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_build(argv: list[str], log: Path) -> Run:
    """Run the build, sampling memory and splitting it into phases at its stage lines."""
    run = Run()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run.phases.append(Phase("start-up (imports, open the checkpoint)", 0.0))
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            anon, rss = _memory(proc.pid)
            cpu = _cpu_seconds(proc.pid)
            with lock:
                phase = run.phases[-1]
                phase.cpu_end = max(phase.cpu_end, cpu)  # the last phase keeps the last sample: the process goes
                if phase.start_anon is None:
                    phase.start_anon = anon
                phase.peak_anon, phase.peak_rss = max(phase.peak_anon, anon), max(phase.peak_rss, rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stderr is not None and proc.stdout is not None
    with log.open("w", encoding="utf-8") as out:
        for line in proc.stderr:
            now = time.perf_counter() - start
            out.write(f"{now:8.1f} {line}")
            out.flush()
            run.tail = [*run.tail[-30:], line.rstrip()]
            if line.startswith("sovpack build: "):
                cpu = _cpu_seconds(proc.pid)
                with lock:
                    run.phases[-1].end, run.phases[-1].cpu_end = now, cpu
                    run.phases.append(Phase(line.removeprefix("sovpack build: ").strip(), now, cpu_start=cpu))
        out.write(proc.stdout.read())
    run.returncode = proc.wait()
    done.set()
    sampler.join()
    run.wall = time.perf_counter() - start
    run.phases[-1].end = run.wall
    run.peak_anon = max(p.peak_anon for p in run.phases)
    run.peak_rss = max(p.peak_rss for p in run.phases)
    return run


PHASE_HEADER = ["phase", "seconds", "cores busy", "anon at start MiB", "peak anon MiB", "peak RSS MiB"]


def phase_rows(run: Run) -> list[list[str]]:
    """The table rows (``PHASE_HEADER``): phase, seconds, cores busy, anonymous MiB as it began, peak anonymous
    MiB, peak RSS MiB, then the whole build. The first anonymous figure is the build's own memory when a runtime
    phase starts, so the runtime's share is the difference."""
    rows = [[p.name, f"{p.end - p.start:.1f}", _busy(p), f"{(p.start_anon or 0) / MIB:,.0f}",
             f"{p.peak_anon / MIB:,.0f}", f"{p.peak_rss / MIB:,.0f}"] for p in run.phases]
    rows.append(["whole build", f"{run.wall:.1f}", "", "", f"{run.peak_anon / MIB:,.0f}", f"{run.peak_rss / MIB:,.0f}"])
    return rows


def _busy(phase: Phase) -> str:
    """CPU seconds over wall seconds: 2.0 is both cores of the benchmark machine busy throughout."""
    wall = phase.end - phase.start
    cpu = phase.cpu_end - phase.cpu_start
    return f"{cpu / wall:.2f}" if wall > 0 and cpu > 0 else ""
