"""sovpack next to llama.cpp's converter on one synthetic Qwen3-MoE checkpoint of at least 1 GiB.

Checkpoint. A random ``Qwen3MoeForCausalLM`` checkpoint (bfloat16, as Qwen3-MoE is published) with Qwen3-MoE's
layout: every layer sparse, experts stored one tensor per projection per expert
(``model.layers.<i>.mlp.experts.<e>.gate_proj.weight`` ...), the router as ``mlp.gate.weight``, q/k norms.
Widths default to hidden 1024, 16 query / 4 KV heads of 128, 32 experts of width 512 with 4 routed per token,
vocabulary 32000, and as many layers as it takes to reach ``--size-gb`` (rounded up, so the checkpoint is at
least that large). Its tokenizer, chat template and generation config are the ``qwen3moe`` fixture's (a small
Qwen2 BPE tokenizer); ``vocab_size`` stays at the embedding's row count, as in padded real checkpoints.

Rows (each command in a fresh process measured by ``_common.measure``, peer first):

- llama.cpp's ``convert_hf_to_gguf.py`` at f16 and q8_0 (from the llama-cpp-python sdist, in the peer venv of
  ``peers.py``; its pre-tokenizer lookup is patched to answer ``qwen2``, since no hash table knows the fixture's
  tokenizer) vs ``sovpack convert -t gguf:f16`` / ``gguf:q8_0`` with parity off.
- ``--extra TARGET`` adds sovpack-only rows (e.g. ``onnx:fp16``, ``openvino:fp16``): the onnxruntime-genai
  model builder and optimum have no Qwen3-MoE exporter to set beside them.

Columns as in peers.py: wall time, peak RSS (``os.wait4``; counts touched pages of the memory-mapped checkpoint,
which are reclaimable page cache), peak anonymous RSS (sampled), output size. The largest single tensor is the
embedding (and the untied head); an expert projection is 1 MiB, so a streaming writer's anonymous peak should be
a small multiple of the embedding as float32 plus the runtime's constant, whatever the expert count.

After the table, each GGUF pair is compared tensor by tensor (name, type, shape, bytes).

Disk: the checkpoint plus two f16-sized and two q8_0-sized GGUF files, about 4.2x the checkpoint (printed
before anything is written).

The machine may be shared: ``--repeat N`` runs every row N times and shows the run of median wall time.

Usage: python benchmarks/moe.py [--size-gb 1.0] [--experts 32] [--extra onnx:fp16] [--repeat 3] [--no-peer]
       [--only-peer] [--keep DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _common import GIB, MIB, ROOT, SizedShapes, mib, print_table, work_dir, write_safetensors
from peers import (
    DEFAULT_PEER_ENV,
    HEADER,
    SOVPACK,
    Job,
    cmd,
    fetch_llama_cpp,
    llama_cpp_shim,
    peer_env,
    run,
)

FIXTURE_VARIANT = "qwen3moe"
# What a finished GGUF is next to the bf16 checkpoint: f16 the same size, q8_0 8.5 bits per weight.
DISK_FACTOR = 1.0 + 2 * (1.0 + 8.5 / 16)
# llama.cpp names the pre-tokenizer by hashing how the tokenizer splits a text; the fixture's is Qwen2's BPE.
PRE_TOKENIZER = "qwen2"


@dataclass(frozen=True, kw_only=True)
class MoEDims(SizedShapes):
    """Shapes of a synthetic Qwen3-MoE checkpoint."""

    hidden: int = 1024
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 32
    experts_per_token: int = 4
    expert_intermediate: int = 512
    vocab: int = 32000
    layers: int = 1
    dtype: str = "bfloat16"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names and shapes in file order, as Qwen3-MoE checkpoints store them."""
        h, inter = self.hidden, self.expert_intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attn.q_proj.weight"] = (q, h)
            out[p + "self_attn.k_proj.weight"] = (kv, h)
            out[p + "self_attn.v_proj.weight"] = (kv, h)
            out[p + "self_attn.o_proj.weight"] = (h, q)
            out[p + "self_attn.q_norm.weight"] = (self.head_dim,)
            out[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.gate.weight"] = (self.experts, h)
            for e in range(self.experts):
                x = f"{p}mlp.experts.{e}."
                out[x + "gate_proj.weight"] = (inter, h)
                out[x + "up_proj.weight"] = (inter, h)
                out[x + "down_proj.weight"] = (h, inter)
        out["model.norm.weight"] = (h,)
        out["lm_head.weight"] = (self.vocab, h)
        return out

    def with_size(self, size_bytes: float) -> MoEDims:
        """The same widths with the fewest layers (at least 1) that make the weights at least ``size_bytes``."""
        fixed = dataclasses.replace(self, layers=0).nbytes()
        per_layer = dataclasses.replace(self, layers=1).nbytes() - fixed
        return dataclasses.replace(self, layers=max(1, math.ceil((size_bytes - fixed) / per_layer)))

    def config(self, fixture_config: dict[str, object]) -> dict[str, object]:
        """The fixture's config.json with these shapes; every layer sparse, as in Qwen3-30B-A3B."""
        config = dict(fixture_config)
        config.update(
            hidden_size=self.hidden,
            intermediate_size=4 * self.expert_intermediate,  # dense layers' width; there are none (mlp_only_layers)
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_experts=self.experts,
            num_experts_per_tok=self.experts_per_token,
            moe_intermediate_size=self.expert_intermediate,
            mlp_only_layers=[],
            decoder_sparse_step=1,
            max_window_layers=self.layers,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            torch_dtype=self.dtype,
        )
        return config


@dataclass(frozen=True)
class MoECheckpoint:
    """A written synthetic MoE checkpoint."""

    path: Path
    dims: MoEDims

    @property
    def weights_bytes(self) -> int:
        return (self.path / "model.safetensors").stat().st_size

    def describe(self) -> str:
        d = self.dims
        name, numel = d.largest()
        experts = d.layers * d.experts * 3
        return (
            f"checkpoint: {self.weights_bytes / MIB:,.0f} MiB {d.dtype} safetensors, Qwen3MoeForCausalLM (hidden "
            f"{d.hidden}, {d.layers} layers, {d.experts} experts of width {d.expert_intermediate}, "
            f"{d.experts_per_token} per token, {d.heads}/{d.kv_heads} heads of {d.head_dim}, vocab {d.vocab}); "
            f"{experts} expert tensors of {d.expert_intermediate * d.hidden * d.itemsize / MIB:,.0f} MiB; largest "
            f"tensor {name} = {numel * d.itemsize / MIB:,.0f} MiB {d.dtype}, {numel * 4 / MIB:,.0f} MiB float32"
        )


def write_moe_checkpoint(out: Path, dims: MoEDims, *, seed: int = 0) -> MoECheckpoint:
    """Write ``dims`` as a checkpoint directory with the qwen3moe fixture's tokenizer (reused when ``out``
    already holds the same one)."""
    sys.path.insert(0, str(ROOT))
    from fixtures.generate import make_checkpoint

    stamp = out.with_name(out.name + ".json")  # beside the checkpoint: converters hash every file inside it
    wanted = json.dumps({"dims": dataclasses.asdict(dims), "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text(encoding="utf-8") == wanted:
        return MoECheckpoint(out, dims)
    stamp.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="sovpack-moe-fixture-") as tmp:
        # NOTE: the v4 config dialect is what Qwen3-30B-A3B's published config.json uses and what the peer's
        # transformers 4 reads; sovpack reads both.
        fixture = make_checkpoint(FIXTURE_VARIANT, Path(tmp) / FIXTURE_VARIANT, config_dialect="v4")
        for f in sorted(fixture.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",) and (
                not f.name.endswith(".index.json")
            ):
                shutil.copyfile(f, out / f.name)
        fixture_config = json.loads((fixture / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps(dims.config(fixture_config), indent=2) + "\n", encoding="utf-8")
    write_safetensors(out / "model.safetensors", dims.shapes(), dims.dtype, seed=seed)
    stamp.write_text(wanted, encoding="utf-8")
    return MoECheckpoint(out, dims)


def sovpack_job(ckpt: Path, work: Path, target: str, note: str = "parity off") -> Job:
    out = work / f"sovpack-{target.replace(':', '-')}"
    argv = cmd(sys.executable, "-m", "sovpack", "convert", ckpt, "-t", target, "-o", out, "--no-parity", "--force")
    return Job(SOVPACK, target, out, argv, note=note)


def plan(ckpt: Path, work: Path, peer_python: Path, llama_script: Path | None, problem: str, extra: list[str],
         peer: bool) -> list[Job]:
    """Every row in order: each llama.cpp run followed by the sovpack run it is compared with, then extras."""
    jobs: list[Job] = []
    for outtype in ("f16", "q8_0"):
        out = work / f"llama.cpp-gguf-{outtype}"
        tool = "llama.cpp convert_hf_to_gguf.py"
        if peer:
            if problem or llama_script is None:
                jobs.append(Job(tool, f"gguf:{outtype}", out, unavailable=problem or "no convert_hf_to_gguf.py"))
            else:
                argv = cmd(peer_python, "-c", llama_cpp_shim(PRE_TOKENIZER), str(llama_script), ckpt, "--outtype",
                           outtype, "--outfile", out / f"model-{outtype}.gguf")
                jobs.append(Job(tool, f"gguf:{outtype}", out, argv,
                                note=f"pre-tokenizer lookup patched to {PRE_TOKENIZER}"))
        jobs.append(sovpack_job(ckpt, work, f"gguf:{outtype}"))
    jobs += [sovpack_job(ckpt, work, target, note="parity off; no peer exporter for Qwen3-MoE") for target in extra]
    return jobs


def compare_gguf(work: Path, outtype: str) -> str:
    """How many tensors llama.cpp's and sovpack's GGUF files of ``outtype`` hold with the same name, type, shape
    and bytes: the two converters are compared on the same output, not only on time and memory."""
    import gguf
    import numpy as np

    files = [next((work / d).glob("*.gguf"), None) for d in (f"llama.cpp-gguf-{outtype}", f"sovpack-gguf-{outtype}")]
    if None in files:
        return f"gguf:{outtype}: not compared (an output is missing)"
    peer, ours = ({t.name: t for t in gguf.GGUFReader(f).tensors} for f in files if f is not None)
    same = sum(
        1 for name, t in peer.items() if name in ours and t.tensor_type == ours[name].tensor_type
        and list(t.shape) == list(ours[name].shape) and np.array_equal(np.asarray(t.data), np.asarray(ours[name].data))
    )
    only = sorted(set(peer) ^ set(ours))
    extra = f"; in one file only: {', '.join(only[:5])}" if only else ""
    return f"gguf:{outtype}: {same} of {len(peer)} llama.cpp tensors identical in sovpack's file ({len(ours)}){extra}"


def median_row(rows: list[list[str]]) -> list[str]:
    """Of several runs' rows of one job, the run with the median wall time (its own memory and size), its note
    saying how many runs and their time range; a failed run makes the row that failure."""
    failed = [r for r in rows if r[2] == "-"]
    if failed or len(rows) == 1:
        return failed[0] if failed else rows[0]
    ranked = sorted(rows, key=lambda r: float(r[2]))
    chosen = list(ranked[(len(ranked) - 1) // 2])
    spread = f"median of {len(rows)} runs ({ranked[0][2]}-{ranked[-1][2]} s)"
    chosen[-1] = f"{chosen[-1]}; {spread}" if chosen[-1] else spread
    return chosen


def main() -> int:
    d = MoEDims()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group("synthetic checkpoint")
    group.add_argument("--size-gb", type=float, default=1.0, help="at least this many GiB of weights (default 1.0)")
    group.add_argument("--hidden", type=int, default=d.hidden)
    group.add_argument("--experts", type=int, default=d.experts)
    group.add_argument("--experts-per-token", type=int, default=d.experts_per_token)
    group.add_argument("--expert-intermediate", type=int, default=d.expert_intermediate)
    group.add_argument("--vocab", type=int, default=d.vocab, help="embedding rows (the tokenizer is smaller)")
    group.add_argument("--dtype", choices=("bfloat16", "float16"), default=d.dtype)
    parser.add_argument("--extra", action="append", default=[], help="a sovpack-only target row, e.g. onnx:fp16")
    parser.add_argument("--no-peer", action="store_true", help="sovpack rows only (no peer venv, no download)")
    parser.add_argument("--only-peer", action="store_true", help="llama.cpp rows only")
    parser.add_argument("--peer-env", type=Path, default=DEFAULT_PEER_ENV, help=f"default: {DEFAULT_PEER_ENV}")
    parser.add_argument("--keep", type=Path, help="work directory to keep and reuse (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the row shows the median-time run")
    args = parser.parse_args()
    dims = MoEDims(hidden=args.hidden, experts=args.experts, experts_per_token=args.experts_per_token,
                   expert_intermediate=args.expert_intermediate, vocab=args.vocab, dtype=args.dtype
                   ).with_size(args.size_gb * GIB)
    size = dims.nbytes()
    print(f"this run needs about {size * DISK_FACTOR / GIB:.1f} GiB of disk: a {size / GIB:.2f} GiB checkpoint and "
          "its GGUF outputs (f16 and q8_0, from both converters)", flush=True)

    with work_dir(args.keep, "sovpack-moe-") as work:
        peer_python, problem, llama_script = args.peer_env / "bin" / "python", "", None
        if not args.no_peer:
            setup_log = work / "setup.log"
            peer_python, problem = peer_env(args.peer_env.expanduser().absolute(), setup_log)
            if not problem:
                llama_script, problem = fetch_llama_cpp(work, setup_log)
            if problem:
                print(f"llama.cpp: {problem} (see {setup_log})", file=sys.stderr)
        path = work / "checkpoint"
        print(f"writing a {size / GIB:.2f} GiB synthetic Qwen3-MoE checkpoint to {path} ...", flush=True)
        ckpt = write_moe_checkpoint(path, dims)
        jobs = plan(ckpt.path, work, peer_python, llama_script, problem, args.extra, not args.no_peer)
        if args.only_peer:
            jobs = [job for job in jobs if job.tool != SOVPACK]
        rows = [median_row([run(job) for _ in range(args.repeat)]) for job in jobs]
        print()
        print(ckpt.describe())
        print(f"largest tensor as float32: {mib(dims.largest()[1] * 4)} MiB")
        print()
        print_table(HEADER, rows)
        if not args.no_peer and not args.only_peer:
            print()
            for outtype in ("f16", "q8_0"):
                print(compare_gguf(work, outtype))
    # A peer that could not run is a result; sovpack failing is not.
    return 1 if any(r[0] == SOVPACK and r[-1].startswith("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
