"""A fanned-out release against one build: each target built as its own part, then ``sovpack assemble``.

On the synthetic Llama-like checkpoint (``--size-gb``, default 1.2 GiB bf16; the parts and bundles need about
4x that on disk): one ``sovpack build`` of every ``--target`` as the single-machine baseline, then the first
target as a part of its own (it computes the parity reference), every other target as a part judged against
that stored reference (``--reference-from``), ``sovpack assemble`` of the parts into one bundle, and
``sovpack verify`` of the result. Here the parts run one after another on one machine; on a CI matrix they run at
once on their own runners, so the release takes the first part + the slowest other part + assemble. Parts and
bundles are local layouts (registry transfer is measured by benchmarks/registry_transfer.py).

    python benchmarks/fanout.py [--keep DIR] [--target onnx:fp16 --target gguf:q8_0 ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _common import add_checkpoint_args, checkpoint_from_args, dir_size, measure, mib, print_table, work_dir

DEFAULT_TARGETS = ("onnx:fp16", "gguf:f16", "openvino:fp16")
HEADER = ("step", "wall s", "peak RSS MiB", "peak anon MiB", "output MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help=f"FORMAT:PRECISION (default: {' '.join(DEFAULT_TARGETS)})")
    add_checkpoint_args(parser, size_gb=1.2)
    parser.set_defaults(dtype="bfloat16")
    args = parser.parse_args()
    targets: list[str] = args.target or list(DEFAULT_TARGETS)
    sovpack = str(Path(sys.executable).with_name("sovpack"))
    with work_dir(args.keep, "sovpack-fanout-bench-") as work:
        checkpoint = checkpoint_from_args(args, work).path
        keys = work / "keys"
        if not (keys / "private.pem").is_file():
            measure([sovpack, "keygen", "-o", str(keys), "--force"], work / "keygen.log")
        key = ["--key", str(keys / "private.pem")]
        rows: list[list[str]] = []
        failures: list[str] = []

        def step(name: str, argv: list[str], out: Path | None) -> None:
            """Run one command measured; ``out``: the directory it writes (emptied first, its size reported)."""
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            print(f"{name} ...", flush=True)
            run = measure(argv, work / f"step-{len(rows)}.log")
            rows.append([name, f"{run.wall_s:.1f}", mib(run.peak_rss), mib(run.peak_anon),
                         mib(dir_size(out)) if out is not None and run.ok and out.exists() else "-"])
            if not run.ok:
                failures.append(f"{name}: {run.failure()}")

        single = work / "single"
        step(f"one build of {' '.join(targets)}",
             [sovpack, "build", str(checkpoint), "-o", str(single), "--tag", "1.0", *key, "-q",
              *(arg for t in targets for arg in ("-t", t))], single)
        parts = []
        for i, target in enumerate(targets):
            part = work / f"part-{target.replace(':', '-')}"
            shared = ["--reference-from", str(parts[0])] if parts else []
            what = "computes the reference" if not parts else "--reference-from the first part"
            step(f"part {target} ({what})",
                 [sovpack, "build", str(checkpoint), "-o", str(part), "--tag", f"1.0-{i}", "-t", target, *key, "-q",
                  *shared], part)
            parts.append(part)
        assembled = work / "assembled"
        step(f"assemble {len(parts)} parts",
             [sovpack, "assemble", str(assembled), "--tag", "1.0", *key, "-q",
              *(arg for p in parts for arg in ("--from", str(p)))], assembled)
        step("verify the assembled bundle",
             [sovpack, "verify", str(assembled), "--key", str(keys / "public.pem")], None)
        print()
        print_table(HEADER, rows)
        part_walls = [float(r[1]) for r in rows[1:1 + len(parts)]]
        if len(part_walls) == len(parts) and not failures:
            latency = part_walls[0] + max(part_walls[1:], default=0.0) + float(rows[1 + len(parts)][1])
            print(f"\nfanned out on {len(parts)} runners: first part + slowest other part + assemble = {latency:.1f} s "
                  f"(one build: {rows[0][1]} s)")
        for failure in failures:
            print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
