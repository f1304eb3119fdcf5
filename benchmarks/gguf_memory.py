"""Time and peak memory of the gguf writer on a synthetic ~1 GB checkpoint.

A random float16 Llama-style checkpoint (hidden 2048, 10 layers, vocabulary 32000 by default: ~1.16 GB of
safetensors) is generated tensor by tensor, with the llama3 fixture's tokenizer files padded out to the
vocabulary. Each precision is then converted in a fresh interpreter with ``convert(..., "gguf:<precision>",
parity=False)``, and the parent records, for that child alone:

- peak RSS (``os.wait4`` rusage): everything resident, including pages of the memory-mapped checkpoint the
  child has touched (file-backed, reclaimable page cache that the kernel maps into the process), and
- peak anonymous RSS (``RssAnon`` in /proc/<pid>/status, sampled every 10 ms): the memory the conversion
  itself allocates. Streaming means this stays a small multiple of the largest tensor above the baseline of a
  child that only imports sovpack, gguf and llama_cpp, whatever the model size.

Usage: python benchmarks/gguf_memory.py [--precision f16 --precision q4_k_m ...] [--layers 10] [--keep DIR]
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
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRELUDE = (
    "import sys; sys.path.insert(0, {root!r})\n"
    "import numpy, gguf\n"
    "from sovpack.targets import gguf as g; g._llama_cpp()\n"
    "from sovpack.convert import convert\n"
)
CONVERT = PRELUDE + "convert({ckpt!r}, {target!r}, {out!r}, parity=False)\n"


def layout(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> dict[str, tuple]:
    """HF tensor names and shapes of a Llama-style model, in file order."""
    head_dim = hidden // heads
    out: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (hidden,)
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            out[p + f"self_attn.{proj}_proj.weight"] = (rows, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def make_checkpoint(out: Path, *, hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> int:
    """Write the synthetic checkpoint (weights streamed in row blocks); returns the largest tensor's size."""
    from fixtures.generate import make_checkpoint as fixture

    small = fixture("llama3", out.parent / "tokenizer-source")
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (small / name).is_file():
            shutil.copyfile(small / name, out / name)
    config = json.loads((small / "config.json").read_text(encoding="utf-8"))
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
        torch_dtype="float16",
    )
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    shapes = layout(hidden, layers, heads, kv_heads, inter, vocab)
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with (out / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            if len(shape) == 1:
                fh.write((1 + 0.1 * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float16).tobytes())
                continue
            scale = np.float32(1 / math.sqrt(shape[1]))
            for start in range(0, shape[0], 512):
                rows = rng.standard_normal((min(512, shape[0] - start), shape[1]), dtype=np.float32) * scale
                fh.write(rows.astype(np.float16).tobytes())
    return max(math.prod(s) for s in shapes.values()) * 2


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(code: str) -> tuple[float, int, int]:
    """Run ``code`` in a fresh interpreter: (seconds, peak RSS, peak anonymous RSS) of that child alone."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            peak_anon = max(peak_anon, rss_anon(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: exit status {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_maxrss * 1024, peak_anon


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--precision", action="append", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
    )
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    precisions = args.precision or ["f16", "q8_0", "q4_k_m"]

    work = args.keep or Path(tempfile.mkdtemp(prefix="sovpack-gguf-memory-"))
    try:
        ckpt = work / "checkpoint"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(work / "tokenizer-source", ignore_errors=True)
        print(f"writing a synthetic checkpoint to {ckpt} ...", flush=True)
        largest = make_checkpoint(
            ckpt,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            inter=args.intermediate,
            vocab=args.vocab,
        )
        size = (ckpt / "model.safetensors").stat().st_size
        _, base_rss, base_anon = run_child(PRELUDE.format(root=str(ROOT)))
        rows = []
        for precision in precisions:
            out = work / f"gguf-{precision}"
            shutil.rmtree(out, ignore_errors=True)
            code = CONVERT.format(root=str(ROOT), ckpt=str(ckpt), target=f"gguf:{precision}", out=str(out))
            print(f"converting to gguf:{precision} ...", flush=True)
            elapsed, peak, anon = run_child(code)
            gguf_size = sum(p.stat().st_size for p in out.glob("*.gguf"))
            rows.append((precision, elapsed, peak, anon, gguf_size))
            shutil.rmtree(out, ignore_errors=True)

        print()
        print(
            f"checkpoint: {mib(size)} float16 safetensors (hidden {args.hidden}, {args.layers} layers, vocab "
            f"{args.vocab}); largest tensor {mib(largest)} as float16, {mib(2 * largest)} as float32"
        )
        print(f"baseline child (imports only): peak RSS {mib(base_rss)}, peak anonymous {mib(base_anon)}")
        print()
        header = ("precision", "time", "peak RSS", "peak anon", "anon - baseline", "output .gguf")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for precision, elapsed, peak, anon, gguf_size in rows:
            cells = (precision, f"{elapsed:.1f} s", mib(peak), mib(anon), mib(anon - base_anon), mib(gguf_size))
            print("| " + " | ".join(cells) + " |")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
