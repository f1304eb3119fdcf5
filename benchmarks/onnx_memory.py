"""Peak memory and time of the onnx writer on a synthetic ~1 GB Llama-like checkpoint.

Writes a random fp16 safetensors checkpoint (hidden 2048, 16 layers, vocab 32000 by default: ~1.15 GB,
streamed to disk one tensor at a time), then converts it with ``convert(..., "onnx:<precision>",
parity=False)`` in a fresh subprocess per precision and reports the child's own peak RSS (``os.wait4``
rusage, which counts touched mmap pages too) next to the largest tensor. A baseline child that only imports
sovpack, onnx and onnxruntime gives the constant part. Streaming means peak - baseline stays a small multiple
of the largest tensor, whatever the model size.

Usage: python benchmarks/onnx_memory.py [--precision fp32 --precision int4 ...] [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = (
    "import sys; sys.path.insert(0, {root!r})\n"
    "import numpy, onnx, onnxruntime\n"
    "import onnxruntime.quantization.matmul_nbits_quantizer\n"
    "from sovpack.convert import convert\n"
    "from sovpack.targets import load_targets\n"
    "load_targets()\n"
)
CONVERT = IMPORTS + "convert({ckpt!r}, {target!r}, {out!r}, parity=False)\n"


def tensor_shapes(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> dict:
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(out: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
                     vocab: int) -> tuple[int, int]:
    """A random fp16 checkpoint, written tensor by tensor; returns (file bytes, largest tensor bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(hidden, layers, heads, kv_heads, inter, vocab)
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with (out / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for shape in shapes.values():
            if len(shape) == 1:
                fh.write((1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16).tobytes())
                continue
            std = np.float32(1.0 / math.sqrt(shape[1]))
            for start in range(0, shape[0], 1024):  # row blocks: the generator's own memory stays small
                rows = min(1024, shape[0] - start)
                block = rng.standard_normal((rows, shape[1]), dtype=np.float32) * std
                fh.write(block.astype(np.float16).tobytes())
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    largest = max(math.prod(s) for s in shapes.values()) * 2
    return (out / "model.safetensors").stat().st_size, largest


def run_child(code: str) -> tuple[float, int]:
    """Run ``code`` in a fresh interpreter; returns (wall seconds, peak RSS bytes of that child alone)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed with exit code {proc.returncode}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports KiB


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", action="append", choices=["fp32", "fp16", "int8", "int4"])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    precisions = args.precision or ["fp32"]

    work = args.keep or Path(tempfile.mkdtemp(prefix="sovpack-onnx-memory-"))
    try:
        ckpt = work / "checkpoint"
        print(f"writing a synthetic checkpoint to {ckpt} ...", flush=True)
        size, largest = write_checkpoint(ckpt, hidden=args.hidden, layers=args.layers, heads=args.heads,
                                         kv_heads=args.kv_heads, inter=args.intermediate, vocab=args.vocab)
        _, baseline = run_child(IMPORTS.format(root=str(ROOT)))
        rows = []
        for precision in precisions:
            out = work / f"onnx-{precision}"
            shutil.rmtree(out, ignore_errors=True)
            code = CONVERT.format(root=str(ROOT), ckpt=str(ckpt), target=f"onnx:{precision}", out=str(out))
            elapsed, peak = run_child(code)
            rows.append((precision, elapsed, peak, dir_size(out)))

        largest_fp32 = largest * 2
        print()
        print(f"checkpoint: {mb(size)} fp16 safetensors, hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}; largest tensor {mb(largest)} fp16 = {mb(largest_fp32)} as float32")
        print(f"baseline (imports only): peak RSS {mb(baseline)}")
        print()
        header = ("precision", "time", "peak RSS", "peak - baseline", "x largest fp32 tensor", "output size")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for precision, elapsed, peak, out_size in rows:
            extra = peak - baseline
            print(f"| {precision} | {elapsed:.1f} s | {mb(peak)} | {mb(extra)} | {extra / largest_fp32:.2f} | "
                  f"{mb(out_size)} |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
