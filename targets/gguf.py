"""GGUF for llama.cpp: a streaming gguf-py writer, llama.cpp's own K-quants, and a llama-cpp-python runner.

Writer. Tensors are named with gguf-py's tables (``gguf.TENSOR_NAMES`` for the architecture's
``gguf.MODEL_TENSORS``), metadata keys come from ``gguf.Keys`` through ``GGUFWriter``'s helpers, and f32 /
f16 / bf16 / q8_0 / q4_0 data from ``gguf.quants.quantize``. The header, key-values and tensor infos are
written first, then tensor data one tensor at a time, read lazily from the checkpoint's memory map, so the
model is never in memory as a whole. The file is written under a temporary name and renamed into place.
q4_k_m / q5_k_m / q6_k are made by llama.cpp's own quantizer (``llama_model_quantize``) from an f32 (or, for
an all-f16 checkpoint, f16) intermediate GGUF that is deleted afterwards.

Architectures. llama and mistral -> ``llama``; qwen2, qwen3, phi3, gemma -> their own llama.cpp
architectures. llama.cpp's ``llama`` architecture applies RoPE to interleaved pairs (x[2i], x[2i+1]) while
Hugging Face rotates halves (x[i], x[i + d/2]); q and k rows (and biases) are therefore permuted per head so
that row 2i holds HF row i and row 2i+1 holds HF row i + d/2. The other four architectures use NEOX-style
RoPE (halves) and need no permutation. Phi-3 stores ``attn_qkv`` = [q; k; v] and ``ffn_up`` = [gate; up].
Gemma's canonical norm weights already include its +1 offset, which is what llama.cpp's gemma expects; it
scales embeddings by sqrt(hidden) itself. Llama 3 RoPE scaling is stored as llama.cpp expects it: a
``rope_freqs.weight`` tensor of per-frequency divisors computed here from the spec.

Metadata. ``general.*`` as gguf-py names it (name, architecture, type, file_type, quantization_version,
``quantized_by`` = "sovpack <version>", license when config.json or README.md front matter states one) plus
the source files' digests: ``general.source.file.count`` and, per file i, ``general.source.file.{i}.path`` /
``.sha256`` / ``.size`` (the same records as the artifact's sovpack-artifact.json). Hyperparameters and RoPE
scaling use llama.cpp's keys: linear -> type linear + factor; YaRN -> type yarn + factor + original context
(+ ``rope.scaling.attn_factor`` = attention_factor / (1 + 0.1 ln factor) when the source sets one, because
llama.cpp multiplies that default in itself). The tokenizer comes from ``_gguf_tokenizer``.

Runner. llama-cpp-python, n_threads=2, fixed seed, logits for every position (``logits_all``), greedy
decoding through llama.cpp's own KV cache. llama.cpp keeps its KV cache in f16 by default; an f32 artifact is
run with an f32 KV cache so its parity check measures the weights and kernels alone (f16 K/V rounding, about
5e-4 relative, would otherwise dominate the 1e-4 f32 threshold); every other precision keeps llama.cpp's
default f16 cache -- what users of the file get -- whose rounding is far below those precisions' own error.
Two runtime workarounds, both measured here: llama.cpp's OpenMP threads wait passively (busy-waiting threads
make each decode ~300x slower on an oversubscribed machine), and llama.cpp's extra CPU buffer types are off on
AMX machines (its AMX kernels crash on q8_0 / q4_0 weights in this release). Limits llama.cpp's kernels cannot
meet (its float16 GELU table, for Gemma at f32) are published as ``parity_threshold_overrides``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import platform
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sovpack import __version__
from sovpack.errors import ConversionError, MissingDependencyError, ParityError, UsageError
from sovpack.model import SourceModel
from sovpack.spec import ModelSpec
from sovpack.targets._gguf_tokenizer import GgufTokenizer, tokenizer_from_checkpoint
from sovpack.targets.base import TARGETS, Progress, WrittenArtifact

GGUF_PRECISIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")
LLAMA_QUANTS = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
PRECISIONS = (*GGUF_PRECISIONS, *LLAMA_QUANTS)
DEFAULT_PRECISION = "f16"

# The head (output projection, or the tied embedding) stays at 8 bits under q4_0, as llama.cpp's own q4_0
# recipe keeps it at a higher type: a 4-bit head moves every logit and costs far more than it saves.
Q4_0_HEAD = "Q8_0"

N_THREADS = 2
SEED = 1234
MIN_CONTEXT = 512
MAX_CONTEXT = 8192


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise MissingDependencyError("gguf", "gguf") from e
    return gguf


def _llama_cpp() -> Any:
    # llama.cpp's CPU backend runs its threads with OpenMP; the default busy-waiting policy makes every
    # barrier cost a scheduler time slice when the machine is busier than its cores (measured: 2 threads on
    # 2 loaded cores, 0.3 s per decode instead of 1 ms). OpenMP reads this once, when llama.cpp's library is
    # loaded; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependencyError("llama_cpp", "llama") from e
    return llama_cpp


# --------------------------------------------------------------------------------------------------------------
# architectures


@dataclass(frozen=True, slots=True)
class ArchPlan:
    """How one source family maps onto a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's arch uses interleaved-pair RoPE
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rope_freqs: bool = False  # reads rope_freqs.weight (Llama 3 scaling)
    q_is_hidden: bool = False  # the arch sizes attn_q / attn_output as hidden x hidden
    always_tied: bool = False
    activation: str = "silu"
    embedding_scale: str | None = None  # "sqrt_hidden": the arch scales embeddings by sqrt(hidden) itself


ARCHES: dict[str, ArchPlan] = {
    "llama": ArchPlan("LLAMA", permute_qk=True, rope_freqs=True),
    "mistral": ArchPlan("LLAMA", permute_qk=True, rope_freqs=True),
    "qwen2": ArchPlan("QWEN2", q_is_hidden=True),
    "qwen3": ArchPlan("QWEN3"),
    "phi3": ArchPlan("PHI3", fused_qkv=True, fused_gate_up=True, q_is_hidden=True),
    "gemma": ArchPlan("GEMMA", always_tied=True, activation="gelu_tanh", embedding_scale="sqrt_hidden"),
}


def arch_plan(spec: ModelSpec) -> ArchPlan:
    """The llama.cpp architecture for a spec, or a ConversionError naming what llama.cpp cannot run."""
    plan = ARCHES.get(spec.family)
    if plan is None:
        raise ConversionError(f"family {spec.family!r} has no GGUF mapping; supported: {', '.join(ARCHES)}")
    where = f"{spec.family} ({spec.architecture})"
    if spec.activation != plan.activation:
        raise ConversionError(
            f"{where}: activation {spec.activation!r}; llama.cpp's {plan.arch.lower()} computes {plan.activation}"
        )
    if spec.norm_kind != "rms":
        raise ConversionError(f"{where}: norm {spec.norm_kind!r} is not supported")
    if plan.q_is_hidden and spec.q_size != spec.hidden_size:
        raise ConversionError(
            f"{where}: heads x head_dim = {spec.q_size} differs from hidden_size {spec.hidden_size}, which "
            f"llama.cpp's {plan.arch.lower()} architecture assumes"
        )
    if plan.always_tied and not spec.tie_word_embeddings:
        raise ConversionError(f"{where}: an untied output head; llama.cpp's {plan.arch.lower()} always ties it")
    expected_scale = math.sqrt(spec.hidden_size) if plan.embedding_scale == "sqrt_hidden" else 1.0
    if not math.isclose(spec.embedding_multiplier, expected_scale, rel_tol=1e-6):
        raise ConversionError(
            f"{where}: embedding multiplier {spec.embedding_multiplier}; llama.cpp's {plan.arch.lower()} uses "
            f"{expected_scale}"
        )
    if spec.qk_norm != (plan.arch == "QWEN3"):
        raise ConversionError(f"{where}: q/k norm = {spec.qk_norm} does not fit llama.cpp's {plan.arch.lower()}")
    scaling = spec.rope_scaling
    if scaling.kind == "llama3" and not plan.rope_freqs:
        raise ConversionError(f"{where}: Llama 3 RoPE scaling needs rope_freqs, which {plan.arch.lower()} lacks")
    if scaling.kind == "yarn" and scaling.truncate is False:
        raise ConversionError(
            f"{where}: YaRN with truncate=false; llama.cpp always rounds the correction range to whole dims"
        )
    return plan


# --------------------------------------------------------------------------------------------------------------
# tensor plan


# Float32 rows converted at a time: a tensor is read from the memory-mapped checkpoint in row blocks of about
# this size, so the only whole-tensor buffer is the encoded (f16 / quantized) output of the tensor being written.
BLOCK_BYTES = 32 * 2**20

Blocks = Callable[[], Iterator[np.ndarray]]


@dataclass(frozen=True, slots=True)
class TensorJob:
    """One GGUF tensor: its name, logical shape (rows, cols) and its float32 data as consecutive row blocks."""

    name: str
    shape: tuple[int, ...]
    blocks: Blocks
    head: bool = False  # the output projection (or the tied embedding that serves as one)


def row_blocks(model: SourceModel, canonical: str, *, align: int = 1) -> Iterator[np.ndarray]:
    """A canonical tensor as float32 row blocks (row counts a multiple of ``align``), read lazily.

    1-D tensors and tensors with a family offset (Gemma's norms) come whole through ``SourceModel.tensor``;
    a block with NaN/Inf defers to it too, so the error is the one every target raises.
    """
    view = model.stored(canonical)
    if view.ndim == 1 or model.tensor_map[canonical].add:
        yield model.tensor(canonical, np.float32)
        return
    rows = max(align, BLOCK_BYTES // max(1, 4 * math.prod(view.shape[1:])) // align * align)
    for start in range(0, view.shape[0], rows):
        block = np.asarray(view[start : start + rows], dtype=np.float32)
        if not model.allow_nonfinite and not np.isfinite(block).all():
            model.tensor(canonical, np.float32)  # raises SourceError naming the file and tensor
        yield block


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
    assert s.low_freq_factor and s.high_freq_factor and s.original_max_position_embeddings
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


def tensor_plan(model: SourceModel, plan: ArchPlan) -> list[TensorJob]:
    """Every GGUF tensor in file order, each produced on demand from canonical tensors."""
    gguf = _gguf()
    spec = model.spec
    arch = gguf.MODEL_ARCH[plan.arch]
    allowed = set(gguf.MODEL_TENSORS[arch])
    t = gguf.MODEL_TENSOR

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
    jobs: list[TensorJob] = []
    jobs.append(TensorJob(name(t.TOKEN_EMBD, "weight"), shapes["embed"], read("embed"), head=spec.tie_word_embeddings))
    if spec.rope_scaling.kind == "llama3":
        factors = llama3_rope_factors(spec)
        jobs.append(TensorJob(name(t.ROPE_FREQS, "weight"), factors.shape, lambda: iter([factors])))
    h, q, kv, ff = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    for i in range(spec.num_layers):
        c = f"layers.{i}."

        def qk(proj: str, heads: int, c: str = c) -> Blocks:
            return permuted(c + proj, heads) if plan.permute_qk else read(c + proj)

        jobs.append(TensorJob(name(t.ATTN_NORM, "weight", i), (h,), read(c + "attn_norm")))
        if plan.fused_qkv:
            jobs.append(
                TensorJob(
                    name(t.ATTN_QKV, "weight", i),
                    (q + 2 * kv, h),
                    concat(qk("q", spec.num_heads), qk("k", spec.num_kv_heads), read(c + "v")),
                )
            )
            if spec.qkv_bias:
                jobs.append(
                    TensorJob(
                        name(t.ATTN_QKV, "bias", i),
                        (q + 2 * kv,),
                        concat(qk("q_bias", spec.num_heads), qk("k_bias", spec.num_kv_heads), read(c + "v_bias")),
                    )
                )
        else:
            jobs.append(TensorJob(name(t.ATTN_Q, "weight", i), (q, h), qk("q", spec.num_heads)))
            jobs.append(TensorJob(name(t.ATTN_K, "weight", i), (kv, h), qk("k", spec.num_kv_heads)))
            jobs.append(TensorJob(name(t.ATTN_V, "weight", i), (kv, h), read(c + "v")))
            if spec.qkv_bias:
                jobs.append(TensorJob(name(t.ATTN_Q, "bias", i), (q,), qk("q_bias", spec.num_heads)))
                jobs.append(TensorJob(name(t.ATTN_K, "bias", i), (kv,), qk("k_bias", spec.num_kv_heads)))
                jobs.append(TensorJob(name(t.ATTN_V, "bias", i), (kv,), read(c + "v_bias")))
        if spec.qk_norm:
            jobs.append(TensorJob(name(t.ATTN_Q_NORM, "weight", i), (spec.head_dim,), read(c + "q_norm")))
            jobs.append(TensorJob(name(t.ATTN_K_NORM, "weight", i), (spec.head_dim,), read(c + "k_norm")))
        jobs.append(TensorJob(name(t.ATTN_OUT, "weight", i), (h, q), read(c + "o")))
        jobs.append(TensorJob(name(t.FFN_NORM, "weight", i), (h,), read(c + "mlp_norm")))
        if plan.fused_gate_up:
            jobs.append(TensorJob(name(t.FFN_UP, "weight", i), (2 * ff, h), concat(read(c + "gate"), read(c + "up"))))
        else:
            jobs.append(TensorJob(name(t.FFN_GATE, "weight", i), (ff, h), read(c + "gate")))
            jobs.append(TensorJob(name(t.FFN_UP, "weight", i), (ff, h), read(c + "up")))
        jobs.append(TensorJob(name(t.FFN_DOWN, "weight", i), (h, ff), read(c + "down")))
    jobs.append(TensorJob(name(t.OUTPUT_NORM, "weight"), (h,), read("final_norm")))
    if not spec.tie_word_embeddings:
        jobs.append(TensorJob(name(t.OUTPUT, "weight"), shapes["lm_head"], read("lm_head"), head=True))
    return jobs


def storage_type(job: TensorJob, precision: str) -> tuple[Any, str | None]:
    """(GGML type, fallback note or None) for one tensor at a gguf-py precision."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if len(job.shape) == 1:
        return q.F32, None
    want = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}[precision]
    if precision == "q4_0" and job.head:
        want = q[Q4_0_HEAD]
    block, _ = gguf.GGML_QUANT_SIZES[want]
    if job.shape[-1] % block:
        return q.F16, f"{job.name}: row length {job.shape[-1]} is not a multiple of the {want.name} block {block}; F16"
    return want, None


def tensor_nbytes(shape: Sequence[int], qtype: Any) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


# --------------------------------------------------------------------------------------------------------------
# metadata


def _license(model: SourceModel) -> str | None:
    """The license the checkpoint states: config.json 'license', else README.md front matter 'license:'."""
    value = model.checkpoint.config.get("license")
    if isinstance(value, str) and value.strip():
        return value.strip()
    readme = model.checkpoint.file("README.md")
    if readme is None:
        return None
    with contextlib.suppress(OSError, UnicodeDecodeError):
        lines = readme.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                m = re.match(r"^license:\s*(\S.*?)\s*$", line)
                if m:
                    return m.group(1).strip("'\"")
    return None


SOURCE_FILE_COUNT = "general.source.file.count"
SOURCE_FILE_KEY = "general.source.file.{id}.{field}"  # field: path, sha256, size


def _add_metadata(writer: Any, model: SourceModel, plan: ArchPlan, tok: GgufTokenizer, file_type: Any) -> None:
    gguf = _gguf()
    spec = model.spec
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.name)
    writer.add_quantized_by(f"sovpack {__version__}")
    writer.add_file_type(int(file_type))
    if file_type not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    license_ = _license(model)
    if license_:
        writer.add_license(license_)
    files = model.checkpoint.source_files
    writer.add_uint32(SOURCE_FILE_COUNT, len(files))
    for i, f in enumerate(files):
        writer.add_string(SOURCE_FILE_KEY.format(id=i, field="path"), f.path)
        writer.add_string(SOURCE_FILE_KEY.format(id=i, field="sha256"), f.sha256)
        writer.add_uint64(SOURCE_FILE_KEY.format(id=i, field="size"), f.size)

    writer.add_vocab_size(spec.vocab_size)
    # llama.cpp's llama / phi3 graphs do not apply a sliding window: advertise only the context where the
    # file computes what the source does (frontends default their context to this).
    writer.add_context_length(context_length(spec))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    s = spec.rope_scaling
    if s.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(s.factor)
    elif s.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(s.factor)
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings or spec.max_position_embeddings)
        # llama.cpp scales cos/sin by attn_factor x (1 + 0.1 ln factor); HF by attention_factor, whose default
        # is exactly (1 + 0.1 ln factor). Only an explicit attention_factor needs the key.
        if s.attention_factor is not None:
            writer.add_rope_scaling_attn_factors(s.attention_factor / yarn_default_mscale(s.factor))
        if (s.beta_fast or 32.0) != 32.0:
            writer.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        if (s.beta_slow or 1.0) != 1.0:
            writer.add_rope_scaling_yarn_beta_slow(s.beta_slow)
    elif s.kind == "llama3":
        # The scaling lives in rope_freqs.weight; the type key stays "none" so nothing is scaled twice.
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    tok.add_to(writer)


def context_length(spec: ModelSpec) -> int:
    if spec.sliding_window is not None:
        return min(spec.max_position_embeddings, spec.sliding_window)
    return spec.max_position_embeddings


def yarn_default_mscale(factor: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


# --------------------------------------------------------------------------------------------------------------
# writing


@dataclass(slots=True)
class _WriteStats:
    types: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def write_gguf(
    model: SourceModel,
    precision: str,
    path: Path,
    progress: Progress,
    *,
    tok: GgufTokenizer,
    plan: ArchPlan,
) -> _WriteStats:
    """Stream the model into ``path`` (via a temporary sibling) at a gguf-py precision."""
    gguf = _gguf()
    jobs = tensor_plan(model, plan)
    ftypes = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    stats = _WriteStats()
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[plan.arch]])
    _add_metadata(writer, model, plan, tok, ftypes[precision])
    chosen = []
    for job in jobs:
        qtype, note = storage_type(job, precision)
        if note:
            stats.fallbacks.append(note)
        chosen.append(qtype)
        stats.types[qtype.name] = stats.types.get(qtype.name, 0) + 1
        writer.add_tensor_info(
            job.name, job.shape, np.dtype(np.float32), tensor_nbytes(job.shape, qtype), raw_dtype=qtype
        )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, (job, qtype) in enumerate(zip(jobs, chosen, strict=True)):
            progress(f"gguf {precision}: {job.name}", n, len(jobs))
            encoded = encode(job, qtype, model)
            writer.write_tensor_data(encoded)
            del encoded
        progress(f"gguf {precision}", len(jobs), len(jobs))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return stats


def encode(job: TensorJob, qtype: Any, model: SourceModel) -> np.ndarray:
    """The tensor's bytes in ``qtype``, encoded block by block into one preallocated buffer."""
    gguf = _gguf()
    out: np.ndarray | None = None
    row = 0
    for block in job.blocks():
        encoded = gguf.quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qtype)
        if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(encoded).all():
            raise ConversionError(
                f"{model.path}: tensor {job.name} has values beyond the float16 range; convert to bf16 or f32 instead"
            )
        if len(job.shape) == 1:
            out, row = encoded, job.shape[0]
            continue
        if out is None:
            out = np.empty((job.shape[0], *encoded.shape[1:]), dtype=encoded.dtype)
        out[row : row + encoded.shape[0]] = encoded
        row += encoded.shape[0]
    if out is None or row != job.shape[0] or out.shape[0] != job.shape[0]:
        raise ConversionError(f"{job.name}: produced {row} rows, expected shape {list(job.shape)}")
    return out


@contextlib.contextmanager
def _quiet_llama() -> Iterator[io.StringIO]:
    """Keep llama.cpp's log lines off the console; yields what was logged meanwhile.

    llama.cpp logs through llama-cpp-python's callback, which prints to ``sys.stderr`` when the
    'llama-cpp-python' logger lets the level through. In 0.3.36 that mapping is one step off (ggml's WARN
    arrives as logging.ERROR), so ``Llama(verbose=False)`` -- which sets ERROR while it loads -- still prints
    every warning, into the JSON output of ``sovpack ... --json`` among others. Here the logger is set to
    CRITICAL, and ``sys.stderr`` is captured while the block runs (model loading); llama.cpp failures surface
    as exceptions. The level stays CRITICAL afterwards: llama.cpp also logs from later calls (decode,
    tokenize).
    """
    logger = logging.getLogger("llama-cpp-python")
    logger.setLevel(logging.CRITICAL)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield captured
    finally:
        logger.setLevel(logging.CRITICAL)


def extra_buffers_allowed() -> bool:
    """Whether the runner lets llama.cpp use its extra CPU buffer types (AMX, repacked weights).

    llama.cpp's AMX path crashes (SIGSEGV in decode) on q8_0 / q4_0 weights with llama-cpp-python 0.3.36 on
    AMX-capable CPUs; with extra buffer types off, the same file runs on the generic CPU kernels. They stay on
    everywhere else.
    """
    info = _llama_cpp().llama_print_system_info().decode("utf-8", "replace")
    return "AMX_INT8 = 1" not in info


@contextlib.contextmanager
def _model_params(*, extra_buffers: bool) -> Iterator[None]:
    """Open models with ``use_extra_bufts`` as given: llama-cpp-python's Llama has no argument for it, so
    the default-params factory it calls is wrapped while a model loads."""
    import llama_cpp.llama_cpp as low

    if extra_buffers:
        yield
        return
    original = low.llama_model_default_params

    def params() -> Any:
        value = original()
        value.use_extra_bufts = False
        return value

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = original


def llama_quantize(src: Path, dst: Path, precision: str, *, threads: int = N_THREADS) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (k-quant mixes), into ``dst`` via a temporary sibling."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTS[precision])
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with _quiet_llama():
            llama_cpp.llama_backend_init()
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ConversionError(
                f"llama.cpp could not quantize {src.name} to {precision} (llama_model_quantize returned {rc})"
            )
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (reads the header only)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def parity_threshold_overrides(spec: ModelSpec, precision: str) -> dict[str, float]:
    """Parity limits llama.cpp's CPU kernels cannot meet for this model, to be applied on top of the defaults.

    ggml's CPU GELU (and GEGLU) is a lookup table indexed by the float16 rounding of its input and holding
    float16 outputs (compiled in: GGML_GELU_FP16), so a GELU model computes its MLP activations at float16
    precision (2^-11 relative) even from f32 weights and an f32 KV cache. On the Gemma fixture this gives
    9e-3 absolute / 8e-4 relative logit error where SiLU families stay at 3e-5 / 2e-6; reproducing the table
    in the numpy reference removes about half of it, the rest being inputs that land on the other side of a
    float16 rounding boundary. These limits are ~2.5-5x the measurement and 5-10x tighter than f16's;
    clear_margin follows parity's rule of 2 x max_abs so top-1 and greedy stay exact requirements.
    """
    plan = ARCHES.get(spec.family)
    if precision == "f32" and plan is not None and plan.activation.startswith("gelu"):
        return {"max_abs": 0.05, "max_rel": 2e-3, "clear_margin": 0.1}
    return {}


def kv_cache_type(precision: str) -> str:
    """The KV-cache type the runner uses for an artifact precision (see the module docstring)."""
    return "f32" if precision == "f32" else "f16"


# --------------------------------------------------------------------------------------------------------------
# the target


class GgufTarget:
    """``gguf``: one .gguf file, parity-checked in llama.cpp through llama-cpp-python."""

    name = "gguf"
    precisions = PRECISIONS
    default_precision = DEFAULT_PRECISION

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> WrittenArtifact:
        if precision not in PRECISIONS:
            raise UsageError(f"gguf has no precision {precision!r}; known: {', '.join(PRECISIONS)}")
        _gguf()
        if precision in LLAMA_QUANTS:
            _llama_cpp()
        from sovpack.prompts import TOKENIZER_CORPUS

        plan = arch_plan(model.spec)
        spec = model.spec
        fallback = {
            "bos": spec.bos_token_id,
            "eos": spec.eos_token_ids[0] if spec.eos_token_ids else None,
            "pad": spec.pad_token_id,
        }
        tok = tokenizer_from_checkpoint(
            model.checkpoint,
            vocab_size=spec.vocab_size,
            model_name=model.name,
            fallback_ids=fallback,
            corpus=TOKENIZER_CORPUS,
        )
        filename = f"{model.name}-{precision}.gguf"
        out = Path(out_dir) / filename
        if precision in LLAMA_QUANTS:
            base = "f16" if set(model.checkpoint.stored_dtypes()) == {"F16"} else "f32"
            intermediate = Path(out_dir) / f".{model.name}-{base}.intermediate.gguf"
            try:
                stats = write_gguf(model, base, intermediate, progress, tok=tok, plan=plan)
                progress(f"gguf {precision}: llama.cpp quantize", 0, 1)
                llama_quantize(intermediate, out, precision)
                progress(f"gguf {precision}: llama.cpp quantize", 1, 1)
            finally:
                with contextlib.suppress(OSError):
                    intermediate.unlink()
            quantizer = f"llama.cpp llama_model_quantize from an {base} intermediate"
        else:
            stats = write_gguf(model, precision, out, progress, tok=tok, plan=plan)
            quantizer = "gguf-py"
        # llama.cpp reads only the .gguf; tokenizer.json & co. ride along for `sovpack run` and provenance.
        from sovpack.convert import copy_support_files

        support = copy_support_files(model, Path(out_dir))
        types = read_tensor_types(out)
        if precision in LLAMA_QUANTS:
            for kind, count in types.items():
                if kind != "F32" and not kind.endswith("_K"):
                    stats.fallbacks.append(
                        f"llama.cpp stored {count} tensor(s) as {kind}: rows not a multiple of the 256-wide K blocks"
                    )
        metadata = {
            "gguf_file": filename,
            "architecture": plan.arch.lower(),
            "qk_permuted_for_interleaved_rope": plan.permute_qk,
            "quantizer": quantizer,
            "tensor_types": types,
            "fallbacks": stats.fallbacks,
            "kv_cache_type": kv_cache_type(precision),
            "tokenizer": tok.summary(),
            "known_tokenizer_divergences": tok.divergent_texts,
            "parity_threshold_overrides": parity_threshold_overrides(spec, precision),
            "notes": _notes(spec, plan, precision),
        }
        return WrittenArtifact(files=(filename, *support), metadata=metadata)

    def open_runner(self, artifact_dir: Path, metadata: dict[str, Any]) -> LlamaCppRunner:
        fmt = metadata.get("format_metadata") or {}
        name = fmt.get("gguf_file")
        path = Path(artifact_dir) / name if name else None
        if path is None or not path.is_file():
            found = sorted(Path(artifact_dir).glob("*.gguf"))
            if len(found) != 1:
                raise ParityError(f"{artifact_dir}: expected one .gguf file, found {len(found)}")
            path = found[0]
        spec = ModelSpec.from_dict(metadata["spec"]) if "spec" in metadata else None
        precision = str(metadata.get("precision", ""))
        return LlamaCppRunner(
            path,
            spec=spec,
            kv_cache=fmt.get("kv_cache_type") or kv_cache_type(precision),
            known_tokenizer_divergences=tuple(fmt.get("known_tokenizer_divergences") or ()),
            threshold_overrides=dict(fmt.get("parity_threshold_overrides") or {}),
        )


def _notes(spec: ModelSpec, plan: ArchPlan, precision: str) -> list[str]:
    notes = []
    if spec.sliding_window is not None:
        notes.append(
            f"the source uses a {spec.sliding_window}-token sliding window, which llama.cpp's "
            f"{plan.arch.lower()} architecture does not apply; the file's context_length and the runner's "
            "context are capped at the window, where both agree"
        )
    if precision == "q4_0":
        notes.append(f"the output head is stored as {Q4_0_HEAD}, as in llama.cpp's own q4_0 recipe")
    s = spec.rope_scaling
    if s.kind == "yarn" and ((s.beta_fast or 32.0) != 32.0 or (s.beta_slow or 1.0) != 1.0):
        notes.append(
            "YaRN betas differ from llama.cpp's defaults (32, 1); the file records them "
            "(rope.scaling.yarn_beta_fast/slow) but most llama.cpp architectures ignore those keys: pass "
            f"yarn_beta_fast={s.beta_fast} / yarn_beta_slow={s.beta_slow} when running it (sovpack's runner does)"
        )
    if parity_threshold_overrides(spec, precision):
        notes.append(
            "llama.cpp's CPU GELU is a float16 lookup table: parity limits are widened for this f32 artifact "
            "(parity_threshold_overrides)"
        )
    return notes


# --------------------------------------------------------------------------------------------------------------
# the runner


class LlamaCppRunner:
    """A GGUF file in llama.cpp (llama-cpp-python): the parity Runner protocol plus ``close``."""

    name = "llama.cpp"

    def __init__(
        self,
        path: Path,
        *,
        spec: ModelSpec | None = None,
        kv_cache: str = "f16",
        n_threads: int = N_THREADS,
        seed: int = SEED,
        known_tokenizer_divergences: Sequence[str] = (),
        threshold_overrides: dict[str, float] | None = None,
    ) -> None:
        self.path = Path(path)
        # Corpus texts llama.cpp is known to tokenize differently, and parity limits its kernels cannot meet
        # (see parity_threshold_overrides); both come from the writer, via the artifact metadata.
        self.threshold_overrides = dict(threshold_overrides or {})
        self.spec = spec
        self.kv_cache = kv_cache
        self.n_threads = n_threads
        self.seed = seed
        self.known_tokenizer_divergences = tuple(known_tokenizer_divergences)
        self._llm: Any = None
        self._n_ctx = 0
        self._vocab: Any = None
        self.extra_buffers: bool | None = None
        limit = spec.max_position_embeddings if spec is not None else MAX_CONTEXT
        if spec is not None and spec.sliding_window is not None:
            limit = min(limit, spec.sliding_window)
        self.context_limit = min(limit, MAX_CONTEXT)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _open(self, positions: int) -> Any:
        if positions > self.context_limit:
            window = self.spec.sliding_window if self.spec is not None else None
            why = (
                f"llama.cpp does not apply the model's {window}-token sliding window, so the runner stops where "
                "both agree"
                if window is not None and window == self.context_limit
                else "the model's context length"
            )
            raise UsageError(
                f"{self.path.name}: {positions} positions exceed the {self.context_limit} the runner allows ({why})"
            )
        if self._llm is not None and positions <= self._n_ctx:
            return self._llm
        llama_cpp = _llama_cpp()
        n_ctx = min(self.context_limit, max(MIN_CONTEXT, 1 << (positions - 1).bit_length()))
        self.close_model()
        ggml_type = llama_cpp.GGML_TYPE_F32 if self.kv_cache == "f32" else llama_cpp.GGML_TYPE_F16
        kwargs: dict[str, Any] = {}
        scaling = self.spec.rope_scaling if self.spec is not None else None
        if scaling is not None and scaling.kind == "yarn":
            # llama-cpp-python passes its own beta defaults (32, 1), which override the file: pass the model's.
            kwargs.update(yarn_beta_fast=scaling.beta_fast or 32.0, yarn_beta_slow=scaling.beta_slow or 1.0)
        self.extra_buffers = extra_buffers_allowed()
        with _quiet_llama() as log, _model_params(extra_buffers=self.extra_buffers), _load_errors(self.path, log):
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_ubatch=min(n_ctx, 512),
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                seed=self.seed,
                logits_all=True,
                type_k=ggml_type,
                type_v=ggml_type,
                flash_attn=False,
                verbose=False,
                **kwargs,
            )
        self._n_ctx = n_ctx
        return self._llm

    def close_model(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
            self._n_ctx = 0

    def close(self) -> None:
        self.close_model()
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- Runner protocol ---------------------------------------------------------------------------------
    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("prefill needs at least one token")
        llm = self._open(len(ids))
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise UsageError("greedy decoding needs at least one prompt token")
        llm = self._open(len(ids) + max_new_tokens)
        stop = {int(s) for s in stop_ids}
        llm.reset()
        llm.eval(ids)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            if token in stop or len(generated) == max_new_tokens:
                break
            llm.eval([token])
        return generated

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer from the GGUF file (vocab only), adding the special tokens the file asks for."""
        return self.encode(text)

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenization of ``text``: BOS/EOS as the file's add_bos/add_eos say (``add_special``),
        special-token texts matched as tokens (``parse_special``)."""
        if self._vocab is None:
            llama_cpp = _llama_cpp()
            with _quiet_llama() as log, _load_errors(self.path, log):
                self._vocab = llama_cpp.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        tokens = self._vocab.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
        return [int(t) for t in tokens]

    def runtime_info(self) -> dict[str, str]:
        llama_cpp = _llama_cpp()
        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": str(getattr(llama_cpp, "__version__", "?")),
            "gguf_file": self.path.name,
            "gguf_sha256": _sha256(self.path),
            "kv_cache_type": self.kv_cache,
            "extra_buffer_types": {None: "not loaded", True: "on", False: "off (AMX crashes)"}[self.extra_buffers],
            "n_threads": str(self.n_threads),
            "seed": str(self.seed),
            "machine": platform.machine(),
            "python": platform.python_version(),
        }


@contextlib.contextmanager
def _load_errors(path: Path, log: io.StringIO) -> Iterator[None]:
    """llama-cpp-python reports a file llama.cpp refuses as a bare ValueError: name the file, add llama.cpp's
    last log lines."""
    try:
        yield
    except ValueError as e:
        tail = " | ".join(line.strip() for line in log.getvalue().splitlines()[-3:] if line.strip())
        raise ParityError(f"{path}: llama.cpp cannot load this GGUF file ({e}){': ' + tail if tail else ''}") from e


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


TARGETS.add("gguf", GgufTarget())
