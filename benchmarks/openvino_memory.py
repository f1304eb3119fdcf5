"""Peak memory of the OpenVINO writer on a synthetic ~1 GB checkpoint.

Generates a bf16 Llama-3-shaped checkpoint with the fixtures generator (size overrides), then converts it to
``openvino:fp16`` (parity off) in fresh subprocesses and prints wall time and peak RSS next to the largest
tensor. Rows:

- ``postponed``: sovpack's writer as shipped: weights are postponed constants that ``ov.save_model``
  materializes one at a time while it writes the ``.bin``.
- ``eager``: the same code with every postponed constant materialized up front (a plain ``Constant``), i.e.
  what building the ``ov.Model`` with ordinary constants costs: the whole model in memory before saving.
- ``compile``: opening the written artifact on the CPU plugin (``OpenvinoRunner``), where OpenVINO holds
  every weight anyway.

Usage: python benchmarks/openvino_memory.py [--layers 8] [--precision fp16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes: VmHWM.

    Not getrusage's ru_maxrss: Linux carries that over from the parent across fork+exec, so a child started by
    a parent that once held more would report the parent's peak.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _status() -> dict[str, int]:
    """RssAnon / RssFile / VmRSS of this process in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class _Sampler(threading.Thread):
    """Samples /proc/self/status every few milliseconds and keeps the peaks of anonymous and file RSS.

    The kernel keeps only the peak of the total (VmHWM). Source weights are read through mmap, so pages of
    the safetensors files count as (file-backed, clean, reclaimable) RSS once touched; the anonymous part is
    what the writer actually allocates.
    """

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key, value in _status().items():
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._stop_event.set()
        self.join()
        for key, value in _status().items():
            self.peak[key] = max(self.peak[key], value)
        return self.peak


# --------------------------------------------------------------------------------------------- the child


def _child(mode: str, checkpoint: Path, out: Path, precision: str) -> dict:
    # Imported before the baseline so library code is not counted as conversion memory.
    import numpy  # noqa: F401
    import openvino
    import openvino_tokenizers  # noqa: F401

    import sovpack.convert  # noqa: F401
    from sovpack.targets import load_targets

    load_targets()
    if mode == "eager":
        import openvino as ov
        import openvino.utils

        def eager(element_type, shape, maker, name=None):  # type: ignore[no-untyped-def]
            const = ov.op.Constant(maker())
            if name is not None:
                const.friendly_name = name
            return const

        openvino.utils.make_postponed_constant = eager
    baseline = _status()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    if mode in ("postponed", "eager"):
        from sovpack.convert import convert

        convert(checkpoint, f"openvino:{precision}", out, parity=False, force=True)
    elif mode == "compile":
        from sovpack.targets.openvino import OpenvinoRunner

        runner = OpenvinoRunner(out, {"precision": precision})
        runner.prefill_logits([1, 2, 3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    return {
        "mode": mode,
        "seconds": seconds,
        "baseline_anon": baseline["RssAnon"],
        "baseline_rss": baseline["VmRSS"],
        "peak_anon": peak["RssAnon"],
        "peak_file": peak["RssFile"],
        "peak_rss": _rss_peak(),
    }


def _run_child(mode: str, checkpoint: Path, out: Path, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(checkpoint), str(out), "--precision", precision]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the parent


def _make_checkpoint(path: Path, layers: int) -> Path:
    from fixtures.generate import make_checkpoint

    return make_checkpoint(
        "llama3",
        path,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        dtype="bfloat16",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8 -> ~1 GB of bf16 weights)")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--keep", type=Path, help="keep the checkpoint and outputs in this directory")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, checkpoint, out = args.child
        print(json.dumps(_child(mode, Path(checkpoint), Path(out), args.precision)))
        return 0

    sys.path.insert(0, str(ROOT))
    work = args.keep or Path(tempfile.mkdtemp(prefix="sovpack-ov-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = work / "checkpoint"
        if not (ckpt / "config.json").is_file():
            started = time.perf_counter()
            _make_checkpoint(ckpt, args.layers)
            print(f"generated {ckpt} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        from sovpack.model import open_model

        spec = open_model(ckpt).spec
        shapes = spec.tensor_shapes()
        largest_name, largest_shape = max(shapes.items(), key=lambda kv: math.prod(kv[1]))
        largest = math.prod(largest_shape)
        source_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        rows = []
        for mode in ("postponed", "eager", "compile"):
            out = work / f"out-{args.precision}" if mode != "eager" else work / f"out-{args.precision}-eager"
            result = _run_child(mode, ckpt, out, args.precision)
            result["bin"] = (out / "openvino_model.bin").stat().st_size
            rows.append(result)
        print(f"checkpoint: {spec.parameter_count() / 1e6:.0f}M parameters, {source_bytes / MIB:.0f} MiB bf16 "
              f"safetensors; largest tensor {largest_name} {list(largest_shape)} = {largest * 2 / MIB:.0f} MiB "
              f"bf16 / {largest * 4 / MIB:.0f} MiB f32; target openvino:{args.precision}")
        header = (f"{'run':<10} {'wall s':>7} {'peak RSS':>9} {'peak anon':>10} {'anon growth':>12} "
                  f"{'/ largest f32':>14} {'/ .bin':>7} {'peak file':>10} {'.bin':>7}")
        print(header + "   (MiB)")
        print("-" * len(header))
        for r in rows:
            growth = r["peak_anon"] - r["baseline_anon"]
            print(f"{r['mode']:<10} {r['seconds']:>7.1f} {r['peak_rss'] / MIB:>9.0f} {r['peak_anon'] / MIB:>10.0f} "
                  f"{growth / MIB:>12.0f} {growth / (largest * 4):>14.2f} {growth / r['bin']:>7.2f} "
                  f"{r['peak_file'] / MIB:>10.0f} {r['bin'] / MIB:>7.0f}")
        print("peak RSS = VmHWM (anonymous + file-backed); anon growth = peak anonymous RSS minus the same process "
              "after imports; peak file = file-backed pages (mmap of the safetensors / IR, reclaimable)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
