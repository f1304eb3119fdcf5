"""Time and peak memory of every sovpack writer on one synthetic ~1 GB checkpoint.

Each target is converted with ``convert(checkpoint, target, out, parity=False)`` in a fresh interpreter. Per
format, a baseline child imports the same modules (sovpack and the format's libraries) and exits: its peak
anonymous memory is the constant part. The table shows, per target, the child's wall time (interpreter start
and imports included), source MiB read per second of it, peak RSS (anonymous + touched pages of the
memory-mapped checkpoint, which are reclaimable page cache), peak anonymous RSS (what the writer allocates),
its growth over the baseline, that growth divided by the largest tensor as float32, and the output size.
Writers stream one tensor at a time, so the growth stays a small multiple of the largest tensor plus a
constant whatever the model size.

Usage: python benchmarks/convert_memory.py [--target onnx:fp32 --target gguf:q8_0 ...] [--size-gb 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from _common import (
    MIB,
    Checkpoint,
    Measurement,
    add_checkpoint_args,
    checkpoint_from_args,
    dir_size,
    measure,
    mib,
    print_table,
    python_child,
    work_dir,
)

DEFAULT_TARGETS = (
    "onnx:fp32", "onnx:fp16", "onnx:int4",
    "gguf:f16", "gguf:q8_0", "gguf:q4_k_m",
    "openvino:fp16", "openvino:int8",
)
# What each format's writer imports; the baseline child imports exactly this and nothing else.
FORMAT_IMPORTS = {
    "onnx": "import onnx, onnxruntime, onnxruntime.quantization.matmul_nbits_quantizer",
    "gguf": "import gguf, gguf.quants, llama_cpp",
    "openvino": "import openvino, openvino_tokenizers",
}
PRELUDE = "import numpy\n{imports}\nfrom sovpack.convert import convert\nfrom sovpack.targets import load_targets\n" \
          "load_targets()\n"
CONVERT = "convert({ckpt!r}, {target!r}, {out!r}, parity=False, force=True)\n"
HEADER = ("target", "wall s", "MiB/s read", "peak RSS MiB", "peak anon MiB", "anon growth MiB",
          "growth / largest f32", "output MiB")


def row(target: str, run: Measurement, baseline: Measurement, ckpt: Checkpoint, out: Path) -> list[str]:
    """One table row; a failed child gets FAILED and no numbers."""
    if not run.ok:
        return [target, "FAILED", *[""] * (len(HEADER) - 2)]
    growth = run.peak_anon - baseline.peak_anon
    largest_f32 = ckpt.dims.largest()[1] * 4
    return [
        target,
        f"{run.wall_s:.1f}",
        f"{ckpt.weights_bytes / MIB / run.wall_s:,.0f}",
        mib(run.peak_rss),
        mib(run.peak_anon),
        mib(growth),
        f"{growth / largest_f32:.2f}",
        mib(dir_size(out)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help=f"FORMAT:PRECISION (default: {' '.join(DEFAULT_TARGETS)})")
    add_checkpoint_args(parser)
    args = parser.parse_args()
    targets: list[str] = args.target or list(DEFAULT_TARGETS)
    unknown = sorted({t.partition(":")[0] for t in targets} - FORMAT_IMPORTS.keys())
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMAT_IMPORTS)}")

    with work_dir(args.keep, "sovpack-convert-memory-") as work:
        ckpt = checkpoint_from_args(args, work)
        baselines: dict[str, Measurement] = {}
        rows: list[list[str]] = []
        failures: list[str] = []
        for target in targets:
            fmt = target.partition(":")[0]
            prelude = PRELUDE.format(imports=FORMAT_IMPORTS[fmt])
            if fmt not in baselines:
                print(f"baseline {fmt} (imports only) ...", flush=True)
                baselines[fmt] = measure(python_child(prelude), work / f"baseline-{fmt}.log")
                if not baselines[fmt].ok:
                    raise SystemExit(f"the {fmt} baseline child failed ({baselines[fmt].failure()}); "
                                     f"see {baselines[fmt].log}")
            out = work / target.replace(":", "-")
            shutil.rmtree(out, ignore_errors=True)
            print(f"converting to {target} ...", flush=True)
            code = prelude + CONVERT.format(ckpt=str(ckpt.path), target=target, out=str(out))
            run = measure(python_child(code), work / f"{target.replace(':', '-')}.log")
            rows.append(row(target, run, baselines[fmt], ckpt, out))
            if not run.ok:
                failures.append(f"{target} FAILED, {run.failure()}")
                print("\n".join(run.tail()), file=sys.stderr)

        print()
        print(ckpt.describe())
        for fmt, base in baselines.items():
            print(f"baseline child, {fmt} (imports only): {base.wall_s:.1f} s, peak RSS {mib(base.peak_rss)} MiB, "
                  f"peak anon {mib(base.peak_anon)} MiB")
        print()
        print_table(HEADER, rows)
        for failure in failures:
            print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
