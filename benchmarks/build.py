"""Time and memory of a whole ``sovpack build`` with parity (conversion + parity on every runtime + signing).

Builds the committed fixture and a synthetic Llama-like checkpoint (``--size-gb``, default 1.2 GiB bf16:
about 0.6B parameters; writing it needs that much disk, the bundle about as much again per 16-bit target)
into a signed bundle of ``--target``s, each build in its own process, its memory sampled every 0.5 s and split
into phases at the build's stage lines (benchmarks/_phases.py): with the default targets the first phase after
the reference is the three writers at once (one read of the checkpoint), the rest each runtime's parity run
and the signing. ``--sovpack`` compares another installation (e.g. an older checkout's virtualenv
``bin/sovpack``) on the same checkpoints, side by side.

    python benchmarks/build.py                                  # this checkout
    python benchmarks/build.py --sovpack /tmp/oldvenv/bin/sovpack --label before
    python benchmarks/build.py --repeat 3                       # each build 3 times: the median run's phases

On a small shared VM whole-build times vary by ~25% from run to run (the first run after an idle spell is the
slow one); ``--repeat`` prints every run's wall time and the phases of the median run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _common import (
    FIXTURE,
    add_checkpoint_args,
    checkpoint_from_args,
    dir_size,
    measure,
    mib,
    print_table,
    work_dir,
)
from _phases import PHASE_HEADER, Run, phase_rows, run_build

DEFAULT_TARGETS = ("onnx:fp16", "gguf:q8_0", "openvino:fp16")
HEADER = ("sovpack", "checkpoint", "targets", "wall s", "peak RSS MiB", "peak anon MiB", "bundle MiB", "runs s")


def build(sovpack: str, checkpoint: Path, out: Path, key: Path, targets: list[str], extra: list[str], log: Path
          ) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sovpack, "build", str(checkpoint), "-o", str(out), "--key", str(key), "--json", *extra]
    for target in targets:
        argv += ["-t", target]
    return run_build(argv, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help=f"FORMAT:PRECISION (default: {' '.join(DEFAULT_TARGETS)})")
    parser.add_argument("--sovpack", default=str(Path(sys.executable).with_name("sovpack")),
                        help="the sovpack executable to measure (default: this interpreter's)")
    parser.add_argument("--label", default="this checkout", help="name of the measured installation in the table")
    parser.add_argument("--threshold", action="append", default=[],
                        help="parity threshold override NAME=VALUE for the synthetic checkpoint (random weights)")
    parser.add_argument("--skip-synthetic", action="store_true", help="only build the committed fixture")
    parser.add_argument("--repeat", type=int, default=1, help="build each checkpoint N times (median run shown)")
    add_checkpoint_args(parser, size_gb=1.2)
    parser.set_defaults(dtype="bfloat16")
    args = parser.parse_args()
    targets: list[str] = args.target or list(DEFAULT_TARGETS)

    with work_dir(args.keep, "sovpack-build-bench-") as work:
        key = work / "keys" / "private.pem"
        if not key.is_file():
            keygen = measure([args.sovpack, "keygen", "-o", str(work / "keys"), "--force"], work / "keygen.log")
            if not keygen.ok:
                raise SystemExit(f"keygen failed: {keygen.failure()}")
        cases: list[tuple[str, Path, list[str]]] = [("fixture llama3", FIXTURE, [])]
        if not args.skip_synthetic:
            ckpt = checkpoint_from_args(args, work)
            extra = [arg for item in args.threshold for arg in ("--threshold", item)]
            cases.append((f"synthetic {ckpt.dims.nbytes() / 2**30:.1f} GiB", ckpt.path, extra))
        rows: list[list[str]] = []
        phases: dict[str, list[list[str]]] = {}
        failures: list[str] = []
        for name, path, extra in cases:
            out = work / "bundle"
            runs: list[Run] = []
            for attempt in range(1, max(1, args.repeat) + 1):
                print(f"building {name} with {args.label} (run {attempt}) ...", flush=True)
                runs.append(build(args.sovpack, path, out, key, targets, extra, work / f"build-{len(rows)}.log"))
                if runs[-1].returncode != 0:
                    break
            run = sorted(runs, key=lambda r: r.wall)[(len(runs) - 1) // 2]  # the median (lower middle) run
            ok = all(r.returncode == 0 for r in runs)
            rows.append([args.label, name, " ".join(targets), f"{run.wall:.1f}", mib(run.peak_rss),
                         mib(run.peak_anon), mib(dir_size(out)) if ok else "-",
                         " / ".join(f"{r.wall:.1f}" for r in runs)])
            phases[name] = phase_rows(run)
            if not ok:
                failed = runs[-1]
                failures.append(f"{name}: exit {failed.returncode}")
                print("\n".join(failed.tail), file=sys.stderr)
        for name, table in phases.items():
            print(f"\n{name}, per phase of the median run (the build's stage lines; memory sampled every 0.5 s):")
            print_table(PHASE_HEADER, table)
        print()
        print_table(HEADER, rows)
        for failure in failures:
            print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
