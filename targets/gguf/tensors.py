"""The GGUF tensors of a model, in file order, each produced on demand from the checkpoint, and their encoding.

Tensors are named with gguf-py's tables (``gguf.TENSOR_NAMES`` for the architecture's ``gguf.MODEL_TENSORS``)
and encoded by ``gguf.quants.quantize``. A tensor is read from the memory-mapped checkpoint in row blocks (a
stacked ``ffn_*_exps`` tensor one expert at a time, see ``experts``) and each block is encoded and handed to
the writer on its own, so no whole tensor is ever in memory. For llama.cpp's ``llama``
architecture q and k rows (and biases) are permuted per head so that row 2i holds HF row i and row 2i+1 holds
HF row i + d/2 (interleaved-pair RoPE). Llama 3 RoPE scaling is stored as llama.cpp expects it: a
``rope_freqs.weight`` tensor of per-frequency divisors computed here from the spec.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from sovpack._io import all_finite, ordered_map
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.gguf.arch import ArchPlan
from sovpack.targets.gguf.experts import expert_bias_blocks, expert_blocks, router_bias_block
from sovpack.targets.gguf.runtime import import_gguf
from sovpack.targets.halves import to_float16

# Float32 rows converted at a time: a tensor is read from the memory-mapped checkpoint in row blocks of about
# this size, each encoded and written before the next is read.
BLOCK_BYTES = 32 * 2**20

# The head (output projection, or the tied embedding) stays at 8 bits under q4_0, as llama.cpp's own q4_0
# recipe keeps it at a higher type: a 4-bit head moves every logit and costs far more than it saves.
Q4_0_HEAD = "Q8_0"

Blocks = Callable[[], Iterator[np.ndarray]]


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorJob:
    """One GGUF tensor: its name, logical shape ([experts,] rows, cols) and its float32 data as consecutive
    row blocks (a stacked expert tensor's blocks run through the experts in order)."""

    name: str
    shape: tuple[int, ...]
    blocks: Blocks
    head: bool = False  # the output projection (or the tied embedding that serves as one)
    # Stored as F32 at every precision: MoE routers (llama.cpp's quantizer never quantizes ffn_gate_inp, and
    # top-k routing is where a rounded logit changes the computation) and [E, n] expert biases.
    f32: bool = False


def row_blocks(model: SourceModel, canonical: str, *, align: int = 1) -> Iterator[np.ndarray]:
    """A canonical tensor as row blocks (row counts a multiple of ``align``), read lazily: float32, or the
    stored bfloat16/float16 itself when that needs no adjustment (``encode`` converts each block once, to its
    type: float16 and bfloat16 then need no float32 copy).

    1-D tensors and tensors with a family offset (Gemma's norms) come whole through ``SourceModel.tensor``;
    a block with NaN/Inf defers to it too, so the error is the one every target raises.
    """
    view = model.stored(canonical)
    if view.ndim == 1 or model.tensor_map[canonical].add:
        yield model.tensor(canonical, np.float32)
        return
    half = model.stores_half(canonical)
    rows = max(align, BLOCK_BYTES // max(1, 4 * math.prod(view.shape[1:])) // align * align)
    for start in range(0, view.shape[0], rows):
        block = np.asarray(view[start : start + rows], dtype=view.dtype if half else np.float32)
        if not model.allow_nonfinite and not all_finite(block):
            model.tensor(canonical, np.float32)  # raises SourceError naming the file and tensor
        yield block
    model.release_pages(canonical)  # the tensor is written: its mapped pages need not stay resident


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or bias entries) per head from HF's rotate-half layout to interleaved pairs."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    out = w.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(rows, *rest))


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 scaling: per-frequency divisors of the unscaled frequencies."""
    s = spec.rope_scaling
    if not (s.low_freq_factor and s.high_freq_factor and s.original_max_position_embeddings):
        raise ConversionError(
            f"{spec.family}: Llama 3 RoPE scaling without low_freq_factor, high_freq_factor and "
            "original_max_position_embeddings"
        )
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2.0 * math.pi / inv_freq
    old = float(s.original_max_position_embeddings)
    low_wavelen = old / s.low_freq_factor
    high_wavelen = old / s.high_freq_factor
    factors = np.ones_like(inv_freq)
    for i, w in enumerate(wavelen):
        if w > low_wavelen:
            factors[i] = s.factor
        elif w >= high_wavelen:
            smooth = (old / w - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors[i] = 1.0 / ((1.0 - smooth) / s.factor + smooth)
    return factors.astype(np.float32)


def longrope_factors(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's rope_factors_long / rope_factors_short: LongRoPE's per-frequency divisors [rotary_dim / 2]."""
    s = spec.rope_scaling
    half = spec.rotary_size // 2
    if s.long_factor is None or s.short_factor is None or len(s.long_factor) != half or len(s.short_factor) != half:
        raise ConversionError(f"{spec.family}: LongRoPE needs {half} long and {half} short factors")
    return np.asarray(s.long_factor, dtype=np.float32), np.asarray(s.short_factor, dtype=np.float32)


def tensor_plan(model: SourceModel, plan: ArchPlan) -> list[TensorJob]:
    """Every GGUF tensor in file order, each produced on demand from canonical tensors."""
    gguf = import_gguf()
    spec = model.spec
    arch = gguf.MODEL_ARCH[plan.arch]
    allowed = set(gguf.MODEL_TENSORS[arch])
    t = gguf.MODEL_TENSOR
    jobs: list[TensorJob] = []

    def add(name: str, shape: tuple[int, ...], blocks: Blocks, *, head: bool = False) -> None:
        jobs.append(TensorJob(name=name, shape=shape, blocks=blocks, head=head))

    def name(kind: Any, suffix: str, bid: int | None = None) -> str:
        if kind not in allowed:
            raise ConversionError(f"llama.cpp's {plan.arch.lower()} architecture has no tensor {kind.name}")
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    def read(canonical: str) -> Blocks:
        return lambda: row_blocks(model, canonical)

    def permuted(canonical: str, heads: int) -> Blocks:
        head_dim = spec.head_dim

        def blocks() -> Iterator[np.ndarray]:
            for block in row_blocks(model, canonical, align=head_dim):
                yield permute_rope_rows(block, block.shape[0] // head_dim)

        return blocks

    def concat(*parts: Blocks) -> Blocks:
        return lambda: (block for part in parts for block in part())

    shapes = spec.tensor_shapes()
    # gguf-py lists the sandwich archs' pre-MLP norm as FFN_PRE_NORM: the same "blk.N.ffn_norm" name; gpt-oss
    # stores it as post_attention_norm.
    if plan.mlp_norm_tensor is not None:
        mlp_norm = t[plan.mlp_norm_tensor]
    else:
        mlp_norm = t.FFN_NORM if t.FFN_NORM in allowed else t.FFN_PRE_NORM
    add(name(t.TOKEN_EMBD, "weight"), shapes["embed"], read("embed"), head=spec.tie_word_embeddings)
    if spec.rope_scaling.kind == "llama3":
        factors = llama3_rope_factors(spec)
        add(name(t.ROPE_FREQS, "weight"), factors.shape, lambda: iter([factors]))
    if spec.rope_scaling.kind == "longrope":
        long_factors, short_factors = longrope_factors(spec)
        add(name(t.ROPE_FACTORS_LONG, "weight"), long_factors.shape, lambda: iter([long_factors]))
        add(name(t.ROPE_FACTORS_SHORT, "weight"), short_factors.shape, lambda: iter([short_factors]))
    h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    for i in range(spec.num_layers):
        c = f"layers.{i}."

        def qk(proj: str, heads: int, c: str = c) -> Blocks:
            return permuted(c + proj, heads) if plan.permute_qk else read(c + proj)

        if spec.pre_norms:
            add(name(t.ATTN_NORM, "weight", i), (h,), read(c + "attn_norm"))
        if plan.fused_qkv:
            add(
                name(t.ATTN_QKV, "weight", i),
                (q + 2 * kv, h),
                concat(qk("q", spec.num_heads), qk("k", spec.num_kv_heads), read(c + "v")),
            )
            if spec.qkv_bias:
                add(
                    name(t.ATTN_QKV, "bias", i),
                    (q + 2 * kv,),
                    concat(qk("q_bias", spec.num_heads), qk("k_bias", spec.num_kv_heads), read(c + "v_bias")),
                )
        else:
            add(name(t.ATTN_Q, "weight", i), (q, h), qk("q", spec.num_heads))
            add(name(t.ATTN_K, "weight", i), (kv, h), qk("k", spec.num_kv_heads))
            add(name(t.ATTN_V, "weight", i), (kv, h), read(c + "v"))
            if spec.qkv_bias:
                add(name(t.ATTN_Q, "bias", i), (q,), qk("q_bias", spec.num_heads))
                add(name(t.ATTN_K, "bias", i), (kv,), qk("k_bias", spec.num_kv_heads))
                add(name(t.ATTN_V, "bias", i), (kv,), read(c + "v_bias"))
        if spec.qk_norm:
            add(name(t.ATTN_Q_NORM, "weight", i), shapes[c + "q_norm"], read(c + "q_norm"))
            add(name(t.ATTN_K_NORM, "weight", i), shapes[c + "k_norm"], read(c + "k_norm"))
        add(name(t.ATTN_OUT, "weight", i), (h, q), read(c + "o"))
        if spec.o_bias:
            add(name(t.ATTN_OUT, "bias", i), (h,), read(c + "o_bias"))
        if spec.attention_sinks:
            add(name(t.ATTN_SINKS, "weight", i), (spec.num_heads,), read(c + "sinks"))
        if spec.post_norms:
            add(name(t.ATTN_POST_NORM, "weight", i), (h,), read(c + "post_attn_norm"))
        if spec.pre_norms:
            add(name(mlp_norm, "weight", i), (h,), read(c + "mlp_norm"))
        if spec.is_sparse(i):
            jobs.extend(expert_jobs(model, plan, i, name))
        else:
            if plan.fused_gate_up:
                add(name(t.FFN_UP, "weight", i), (2 * ff, h), concat(read(c + "gate"), read(c + "up")))
            else:
                add(name(t.FFN_GATE, "weight", i), (ff, h), read(c + "gate"))
                add(name(t.FFN_UP, "weight", i), (ff, h), read(c + "up"))
            add(name(t.FFN_DOWN, "weight", i), (h, ff), read(c + "down"))
        if spec.post_norms:
            add(name(t.FFN_POST_NORM, "weight", i), (h,), read(c + "post_mlp_norm"))
    add(name(t.OUTPUT_NORM, "weight"), (h,), read("final_norm"))
    if not spec.tie_word_embeddings:
        add(name(t.OUTPUT, "weight"), shapes["lm_head"], read("lm_head"), head=True)
    return jobs


def expert_jobs(model: SourceModel, plan: ArchPlan, layer: int, name: Callable[..., str]) -> list[TensorJob]:
    """One sparse layer's router (and bias) and stacked ffn_*_exps tensors (and biases), each from canonical
    per-expert tensors read one expert at a time."""
    gguf = import_gguf()
    t = gguf.MODEL_TENSOR
    spec = model.spec
    moe = spec.moe
    assert moe is not None and plan.moe is not None
    h, e, inter = spec.hidden_size, moe.num_experts, moe.expert_intermediate_size
    router = f"layers.{layer}.router"
    jobs = [
        TensorJob(
            name=name(t.FFN_GATE_INP, "weight", layer),
            shape=(e, h),
            blocks=lambda: row_blocks(model, router),
            f32=True,
        )
    ]
    if plan.moe.biases:
        jobs.append(
            TensorJob(
                name=name(t.FFN_GATE_INP, "bias", layer),
                shape=(e,),
                blocks=functools.partial(router_bias_block, model, layer),
                f32=True,
            )
        )
    for kind, proj, rows, cols in (
        (t.FFN_GATE_EXP, "gate", inter, h),
        (t.FFN_UP_EXP, "up", inter, h),
        (t.FFN_DOWN_EXP, "down", h, inter),
    ):
        jobs.append(
            TensorJob(
                name=name(kind, "weight", layer),
                shape=(e, rows, cols),
                blocks=functools.partial(expert_blocks, model, layer, proj),
            )
        )
        if plan.moe.biases:
            jobs.append(
                TensorJob(
                    name=name(kind, "bias", layer),
                    shape=(e, rows),
                    blocks=functools.partial(expert_bias_blocks, model, layer, proj, rows),
                    f32=True,
                )
            )
    return jobs


def storage_type(job: TensorJob, precision: str) -> tuple[Any, str | None]:
    """(GGML type, fallback note or None) for one tensor at a gguf-py precision."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if len(job.shape) == 1 or job.f32:
        return q.F32, None
    want = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[precision]
    if precision == "q4_0" and job.head:
        want = q[Q4_0_HEAD]
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if job.shape[-1] % block:
        return q.F16, f"{job.name}: row length {job.shape[-1]} is not a multiple of the {want.name} block {block}; F16"
    return want, None


def tensor_nbytes(shape: Sequence[int], qtype: Any) -> int:
    """Bytes of a tensor of ``shape`` stored as ``qtype`` (whole quantization blocks per row)."""
    gguf = import_gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def encode(job: TensorJob, qtype: Any, model: SourceModel) -> Iterator[np.ndarray]:
    """The tensor's bytes in ``qtype``, one encoded row block at a time (the writer streams them to the file);
    blocks are encoded on every core (``ordered_map``), in order, but float32 ones.

    The row count is checked as blocks arrive; a short or long tensor raises ConversionError (the writer's
    temporary file is then removed).
    """
    gguf = import_gguf()
    rows = math.prod(job.shape[:-1])
    done = 0
    q = gguf.GGMLQuantizationType

    def one(block: np.ndarray) -> tuple[np.ndarray, int]:
        block = block.reshape(-1, job.shape[-1])
        if qtype == q.BF16 and block.dtype == ml_dtypes.bfloat16:  # stored bf16: these are the bytes
            encoded = np.ascontiguousarray(block).view(np.uint8)
        elif qtype == q.F16:  # stored bf16/f16: one exact cast (float32: the same cast, checked the same way)
            encoded = to_float16(job.name, block, where=str(model.path), advice="use gguf:bf16 or gguf:f32")
        else:
            encoded = gguf.quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qtype)
        return encoded, block.shape[0]

    # Every core, except for float32 (a copy: memory-bound, and ordered_map's blocks in flight would only cost)
    for encoded, count in (map(one, job.blocks()) if qtype == q.F32 else ordered_map(one, job.blocks())):
        done += count
        if done > rows:
            break
        yield encoded
    if done != rows:
        raise ConversionError(f"{job.name}: produced {done} rows, expected shape {list(job.shape)}")
