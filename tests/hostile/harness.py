"""Running sovpack on hostile input the way a user would: a separate process, with hard limits.

Every case runs the CLI in a child process whose CPU time and address space are capped with
``setrlimit`` (the kernel enforces them: a runaway child is killed, never a test that guesses at
wall-clock time), plus a wall-clock ceiling that only catches a child blocked without using CPU (a FIFO
read, a stalled socket). A case passes when the child exits 1 (or 2 for usage errors) with one line on
stderr naming the problem, no traceback, within the limits, and without writing outside its output.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_SECONDS = 60  # RLIMIT_CPU: a hostile input must be refused long before this
ADDRESS_SPACE = 3 * 1024**3  # RLIMIT_AS: numpy + the interpreter need ~1 GiB of address space; bombs need more
WALL_SECONDS = 90  # only for children blocked without using CPU


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def message(self) -> str:
        return self.stderr.strip()


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cli(args: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> Outcome:
    """``sovpack ARGS`` in a limited child process."""
    argv = [sys.executable, "-m", "sovpack", *map(str, args)]
    child_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    try:
        done = subprocess.run(argv, cwd=cwd, env=child_env, capture_output=True, text=True, timeout=WALL_SECONDS,
                              preexec_fn=_limits, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as e:
        return Outcome(-1, str(e.stdout or ""), str(e.stderr or ""), timed_out=True)
    return Outcome(done.returncode, done.stdout, done.stderr, timed_out=False)


def assert_refused(outcome: Outcome, *, mentions: Sequence[str] = (), usage: bool = False) -> None:
    """Refused cleanly: exit 1 (2 for usage), one ``error:`` line naming the problem, no traceback."""
    assert not outcome.timed_out, f"hung (no exit within {WALL_SECONDS} s): {outcome.stderr[-500:]}"
    killed = f"killed by signal {-outcome.returncode} (a resource limit?): {outcome.stderr[-500:]}"
    assert outcome.returncode >= 0, killed
    assert "Traceback" not in outcome.stderr, outcome.stderr[-2000:]
    expected = 2 if usage else 1
    assert outcome.returncode == expected, f"exit {outcome.returncode}, expected {expected}: {outcome.stderr[-1000:]}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or line.startswith("Error:")]
    assert len(errors) == 1, f"expected one error line: {outcome.stderr[-1000:]}"
    for word in mentions:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below ``root``: compare before/after to prove nothing else was written."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            snapshot[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return snapshot
