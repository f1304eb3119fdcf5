"""A release-size build on one machine: a synthetic Llama-3-8B-shaped checkpoint through ``sovpack build`` with
parity, timed and measured per phase (issue 17).

The checkpoint has the real shapes (hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336, vocabulary
128256, untied head; bf16, sharded in ~5 GB files with a model.safetensors.index.json like published ones) and
random weights: about 16 GB of disk, written once into the work directory and reused, plus the bundle (~14 GB
for the 4-bit set, ~32 GB for the fp16 set's targets that fit 24 GB) and scratch space. Targets whose parity
check this machine's memory cannot hold (an 8B onnx:fp16: onnxruntime widens it to float32) are refused up
front, as ``sovpack build`` refuses them; the script prints the refusal and builds the rest.

Random weights give near-uniform logits, so 4-bit artifacts of them fail parity by nature (their mean KL is
measured, not a defect): the 4-bit set runs with the ``--threshold`` overrides printed in the table. Each build
runs in its own process; a sampler reads its anonymous and total resident memory every 0.5 s and the build's
stage lines on stderr mark the phases (calibration, quantization plan, conversion, parity, store + sign).

    python benchmarks/release_size.py --keep /data/sovpack-8b            # the 4-bit deployment set
    python benchmarks/release_size.py --keep /data/sovpack-8b --set fp16
    python benchmarks/release_size.py --keep /data/sovpack-8b --group-size 32    # 4-bit groups of 32
    python benchmarks/release_size.py --layers 4 --keep /tmp/small       # a 4-layer slice, to try it quickly
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from _common import (
    GIB,
    Dims,
    checkpoint_is_current,
    dir_size,
    mark_written,
    print_table,
    work_dir,
    write_safetensors,
)
from _phases import PHASE_HEADER, phase_rows, run_build

SETS = {
    "int4": ("onnx:int4", "gguf:q4_k_m", "openvino:int4"),
    "fp16": ("onnx:fp16", "gguf:f16", "openvino:fp16"),
}
# Random weights: what 4-bit rounding does to near-uniform logits (measured on this checkpoint) is let through.
RANDOM_WEIGHT_THRESHOLDS = ("mean_kl=2.0", "min_top1=none", "min_greedy=none", "max_abs=none", "max_rel=none")
SHARD_BYTES = 5 * GIB


def llama3_8b(layers: int) -> Dims:
    return Dims(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=layers,
                dtype="bfloat16")


def write_sharded(out: Path, dims: Dims) -> Path:
    """``dims`` as a sharded bf16 checkpoint (reused when ``out`` already holds it)."""
    if checkpoint_is_current(out, dims, {"sharded": SHARD_BYTES}):
        return out
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in dims.shapes().items():
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
    weight_map = {}
    for i, shapes in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {file} ({len(shapes)} tensors)", flush=True)
        write_safetensors(out / file, shapes, "bfloat16", seed=i)
        weight_map.update(dict.fromkeys(shapes, file))
    index = {"metadata": {"total_size": dims.nbytes()}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    mark_written(out, dims, {"sharded": SHARD_BYTES})
    return out


def fitting(targets: tuple[str, ...], checkpoint: Path) -> tuple[tuple[str, ...], list[str]]:
    """The targets whose parity check this machine's memory can hold (sovpack's own up-front check, the one
    ``sovpack build`` runs first), and the refusal of each other one."""
    from sovpack.errors import SovpackError
    from sovpack.source.model import open_model
    from sovpack.targets import TargetRef
    from sovpack.targets.base import check_runtime_memory

    spec = open_model(checkpoint).spec
    kept: list[str] = []
    refused: list[str] = []
    for target in targets:
        try:
            check_runtime_memory([TargetRef.parse(target)], spec)
        except SovpackError as e:
            refused.append(str(e))
            continue
        kept.append(target)
    return tuple(kept), refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS), default="int4", help="the targets to build (default int4)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    parser.add_argument("--sovpack", default=str(Path(sys.executable).with_name("sovpack")))
    parser.add_argument("--group-size", type=int,
                        help="4-bit group size of the onnx/openvino int4 targets, in a build config's per-target "
                             "[quantization] tables (default: sovpack's, 128 from 6B parameters, else 32)")
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse (default: a temporary one)")
    args = parser.parse_args()
    targets = SETS[args.set]
    dims = llama3_8b(args.layers)
    with work_dir(args.keep, "sovpack-release-size-") as work:
        print(f"checkpoint: Llama-3-8B shapes, {args.layers} layers, {dims.nbytes() / GIB:.1f} GiB bf16", flush=True)
        checkpoint = write_sharded(work / "checkpoint-8b", dims)
        keys = work / "keys"
        if not (keys / "private.pem").is_file():
            subprocess.run([args.sovpack, "keygen", "-o", str(keys), "--force"], check=True, capture_output=True)
        out = work / f"bundle-{args.set}"
        shutil.rmtree(out, ignore_errors=True)
        targets, refused = fitting(targets, checkpoint)
        for reason in refused:  # what sovpack build itself refuses up front, before reading anything
            print(f"refused up front: {reason}", flush=True)
        if not targets:
            return 1
        argv = [args.sovpack, "build", str(checkpoint), "-o", str(out), "--key", str(keys / "private.pem"), "--json"]
        for target in targets:
            argv += ["-t", target]
        if args.group_size:  # for the formats whose 4-bit groups can be chosen; GGUF keeps GGML's 32-wide blocks
            config = work / f"group-{args.group_size}.toml"
            config.write_text("".join(f'[quantization.targets."{t}"]\ngroup_size = {args.group_size}\n'
                                      for t in targets if t.endswith(":int4")), encoding="utf-8")
            argv += ["--config", str(config)]
        overrides = RANDOM_WEIGHT_THRESHOLDS if args.set == "int4" else ()
        for item in overrides:
            argv += ["--threshold", item]
        print("running: " + " ".join(argv[1:]), flush=True)
        run = run_build(argv, work / f"build-{args.set}.log")
        rows = phase_rows(run)
        print()
        group = f" (int4 groups of {args.group_size})" if args.group_size else ""
        print(f"sovpack build -t {' -t '.join(targets)}{group}" + (f" (thresholds: {', '.join(overrides)})"
                                                                    if overrides else ""))
        print_table(PHASE_HEADER, rows)
        if run.returncode == 0:
            print(f"\nbundle: {dir_size(out) / GIB:.1f} GiB; log: {work / f'build-{args.set}.log'}")
            return 0
        print(f"\nFAILED (exit {run.returncode}):\n" + "\n".join(run.tail), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
