"""Shared pieces of the benchmark scripts: a synthetic checkpoint, a measured child process, a table printer.

Checkpoint. A random Llama-shaped checkpoint (TinyLlama's widths by default: hidden 2048, 32 heads, 4 KV
heads, intermediate 5632, vocabulary 32000) with as many layers as it takes to reach ``--size-gb``. The weights
are streamed into one ``model.safetensors`` one row block at a time, so writing it needs little memory. The
tokenizer files are the llama3 fixture's (605 tokens); ``vocab_size`` stays at the embedding's row count,
which is larger, as in real checkpoints whose embeddings are padded past the tokenizer.

Measurement. Each command runs under a small launcher (this file run as a script) that starts it, samples
``RssAnon`` in ``/proc/<pid>/status`` every 10 ms and reaps it with ``os.wait4``. The launcher is needed for
an honest peak RSS: Linux carries the parent's high-water mark into a child across fork + exec, so the
rusage of a child of a big parent reports the parent's peak. The launcher is a fresh, small interpreter, so
the rusage it gets is the command's own.

Usage as the launcher (internal): python benchmarks/_common.py RESULT.json COMMAND [ARG ...]
"""

from __future__ import annotations

import argparse
import dataclasses
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported lazily: the launcher must stay a small process
    import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "checkpoints" / "llama3"
# Everything of the fixture but its weights and config: tokenizer, chat template, generation config.
SUPPORT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
MIB = 2**20
GIB = 2**30
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
BLOCK_ELEMENTS = 4 * 2**20  # rows are generated in blocks of about this many values (16 MiB as float32)
SAMPLE_INTERVAL = 0.01


# --------------------------------------------------------------------------------------------------------------
# the synthetic checkpoint


class SizedShapes:
    """Byte counts of a synthetic checkpoint described by ``shapes()`` (name -> shape) and ``dtype``."""

    dtype: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def nbytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values()) * self.itemsize

    def largest(self) -> tuple[str, int]:
        """Name and element count of the largest tensor."""
        name, shape = max(self.shapes().items(), key=lambda kv: math.prod(kv[1]))
        return name, math.prod(shape)


@dataclass(frozen=True, kw_only=True)
class Dims(SizedShapes):
    """Shapes of a synthetic Llama-style checkpoint."""

    hidden: int = 2048
    intermediate: int = 5632
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    layers: int = 1
    dtype: str = "float16"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names and shapes, in file order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (self.heads * self.head_dim, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            out[p + "self_attn.o_proj.weight"] = (h, self.heads * self.head_dim)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.up_proj.weight"] = (self.intermediate, h)
            out[p + "mlp.down_proj.weight"] = (h, self.intermediate)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def with_size(self, size_bytes: float) -> Dims:
        """The same widths with the layer count (at least 1) that comes closest to ``size_bytes``."""
        fixed = dataclasses.replace(self, layers=0).nbytes()
        per_layer = dataclasses.replace(self, layers=1).nbytes() - fixed
        return dataclasses.replace(self, layers=max(1, round((size_bytes - fixed) / per_layer)))

    def config(self) -> dict[str, object]:
        """The fixture's config.json with these shapes."""
        config = json.loads((FIXTURE / "config.json").read_text(encoding="utf-8"))
        config.update(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            rope_scaling=None,
            torch_dtype=self.dtype,
        )
        return config


@dataclass(frozen=True)
class Checkpoint:
    """A written synthetic checkpoint."""

    path: Path
    dims: Dims

    @property
    def weights_bytes(self) -> int:
        return (self.path / "model.safetensors").stat().st_size

    def describe(self) -> str:
        name, numel = self.dims.largest()
        d = self.dims
        return (
            f"checkpoint: {self.weights_bytes / MIB:,.0f} MiB {d.dtype} safetensors (hidden {d.hidden}, "
            f"{d.layers} layers, intermediate {d.intermediate}, {d.heads}/{d.kv_heads} heads, vocab {d.vocab}); "
            f"largest tensor {name} = {numel * d.itemsize / MIB:,.0f} MiB {d.dtype}, {numel * 4 / MIB:,.0f} MiB "
            "float32"
        )


def _random_rows(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[bytes]:
    """Random weights for one tensor in row blocks: N(0, 1/fan_in) matrices, ~1 norm vectors."""
    import numpy as np

    if len(shape) == 1:
        yield (1.0 + 0.1 * rng.standard_normal(shape[0], dtype=np.float32)).astype(dtype).tobytes()
        return
    rows, cols = shape
    scale = np.float32(1.0 / math.sqrt(cols))
    step = max(1, BLOCK_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        block *= scale
        yield block.astype(dtype).tobytes()


def _stamp(out: Path) -> Path:
    return out.with_name(out.name + ".json")  # beside the checkpoint: converters hash every file inside it


def checkpoint_is_current(out: Path, dims: Dims, recipe: dict[str, object]) -> bool:
    """True when ``out`` already holds the checkpoint ``dims`` + ``recipe`` describe; otherwise ``out`` is emptied
    and given the fixture's tokenizer files and a config.json for ``dims``, ready for weights (and
    ``mark_written`` once they are)."""
    stamp = _stamp(out)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == _recipe(dims, recipe):
        return True
    stamp.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in SUPPORT_FILES:
        shutil.copyfile(FIXTURE / name, out / name)
    (out / "config.json").write_text(json.dumps(dims.config(), indent=2) + "\n", encoding="utf-8")
    return False


def mark_written(out: Path, dims: Dims, recipe: dict[str, object]) -> None:
    _stamp(out).write_text(_recipe(dims, recipe), encoding="utf-8")


def _recipe(dims: Dims, recipe: dict[str, object]) -> str:
    return json.dumps({"dims": dataclasses.asdict(dims), **recipe}, sort_keys=True)


def write_checkpoint(out: Path, dims: Dims, *, seed: int = 0) -> Checkpoint:
    """Write ``dims`` as a checkpoint directory (reused when ``out`` already holds the same one)."""
    import ml_dtypes
    import numpy as np

    if checkpoint_is_current(out, dims, {"seed": seed}):
        return Checkpoint(out, dims)

    shapes = dims.shapes()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dims.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dims.dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dims.dtype == "bfloat16" else dims.dtype)
    rng = np.random.default_rng(seed)
    with (out / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            for chunk in _random_rows(rng, shape, np_dtype):
                fh.write(chunk)
    mark_written(out, dims, {"seed": seed})
    return Checkpoint(out, dims)


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, *, seed: int = 0) -> None:
    """Stream random weights of ``shapes`` (file order) into one safetensors file, a row block at a time, so
    writing a checkpoint of any size needs little memory (what ``write_checkpoint`` does, for any tensor set)."""
    import ml_dtypes
    import numpy as np

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    itemsize = 4 if dtype == "float32" else 2
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    rng = np.random.default_rng(seed)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for shape in shapes.values():
            for chunk in _random_rows(rng, shape, np_dtype):
                fh.write(chunk)


def add_checkpoint_args(parser: argparse.ArgumentParser, *, size_gb: float = 1.0) -> None:
    """The options shared by every benchmark: checkpoint size and shape, and where to work."""
    d = Dims()
    group = parser.add_argument_group("synthetic checkpoint")
    group.add_argument("--size-gb", type=float, default=size_gb, help=f"weights size in GiB (default {size_gb})")
    group.add_argument("--hidden", type=int, default=d.hidden)
    group.add_argument("--intermediate", type=int, default=d.intermediate)
    group.add_argument("--heads", type=int, default=d.heads)
    group.add_argument("--kv-heads", type=int, default=d.kv_heads)
    group.add_argument("--vocab", type=int, default=d.vocab, help="embedding rows (the tokenizer has 605 tokens)")
    group.add_argument("--dtype", choices=sorted(SAFETENSORS_DTYPES), default=d.dtype)
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse (default: a temporary one)")


def checkpoint_from_args(args: argparse.Namespace, work: Path) -> Checkpoint:
    """Write (or reuse) the checkpoint the parsed ``add_checkpoint_args`` options describe."""
    dims = Dims(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                vocab=args.vocab, dtype=args.dtype).with_size(args.size_gb * GIB)
    path = work / "checkpoint"
    print(f"writing a {dims.nbytes() / GIB:.2f} GiB synthetic checkpoint to {path} ...", flush=True)
    return write_checkpoint(path, dims)


@contextmanager
def work_dir(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created, never deleted) or a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# measured children


@dataclass(frozen=True)
class Measurement:
    """What one command cost: wall time, peak RSS and peak anonymous RSS of that process alone (bytes)."""

    returncode: int
    wall_s: float
    peak_rss: int
    peak_anon: int
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, count: int = 20) -> list[str]:
        """The last ``count`` non-empty lines of the command's output."""
        lines = self.log.read_text(encoding="utf-8", errors="replace").splitlines() if self.log.is_file() else []
        return [ln.rstrip() for ln in lines if ln.strip()][-count:]

    def failure(self, width: int = 160) -> str:
        """``exit N: <last line of the output>``."""
        last = self.tail(1)
        return f"exit {self.returncode}: {last[0].strip()[:width] if last else '(no output)'}"


def measure(argv: Sequence[str | Path], log: Path, *, cwd: Path = ROOT, env: dict[str, str] | None = None
            ) -> Measurement:
    """Run ``argv`` in a fresh process under the launcher; its stdout and stderr go to ``log``."""
    result = log.with_name(log.name + ".measure.json")
    result.unlink(missing_ok=True)
    with log.open("wb") as out:
        subprocess.run([sys.executable, __file__, str(result), *map(str, argv)], cwd=cwd, env=env, stdout=out,
                       stderr=subprocess.STDOUT, check=False)
    if not result.is_file():
        return Measurement(returncode=-1, wall_s=math.nan, peak_rss=0, peak_anon=0, log=log)
    return Measurement(**json.loads(result.read_text(encoding="utf-8")), log=log)


def python_child(code: str) -> list[str]:
    """argv running ``code`` in this interpreter."""
    return [sys.executable, "-c", code]


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _launch(result: Path, argv: Sequence[str]) -> int:
    """The launcher: run ``argv``, sample its RssAnon, reap it with wait4, write the numbers to ``result``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.wait(SAMPLE_INTERVAL):
            peak_anon = max(peak_anon, _rss_anon(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    numbers = {"returncode": proc.returncode, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024,  # KiB on Linux
               "peak_anon": peak_anon}
    result.write_text(json.dumps(numbers), encoding="utf-8")
    return 0


# --------------------------------------------------------------------------------------------------------------
# output


def dir_size(path: Path) -> int:
    """Bytes of every file under ``path`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return cell in ("", "-")
    return True


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, padded so it also reads as plain text: numeric columns right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = [all(_is_number(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right, strict=True))
          + "|")
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__.rsplit("Usage as the launcher (internal): ", 1)[-1])
    sys.exit(_launch(Path(sys.argv[1]), sys.argv[2:]))
