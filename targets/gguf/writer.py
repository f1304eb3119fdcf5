"""The streaming GGUF writer (gguf-py): header and key-values first, then tensor data one tensor at a time.

Metadata. ``general.*`` as gguf-py names it (name, architecture, type, file_type, quantization_version,
``quantized_by`` = "sovpack <version>", license when config.json or README.md front matter states one) plus
the source files' digests: ``general.source.file.count`` and, per file i, ``general.source.file.{i}.path`` /
``.sha256`` / ``.size`` (the same records as the artifact's sovpack-artifact.json). Hyperparameters and RoPE
scaling use llama.cpp's keys: linear -> type linear + factor; YaRN -> type yarn + factor + original context
(+ ``rope.scaling.attn_factor`` = attention_factor / (1 + 0.1 ln factor) when the source sets one, because
llama.cpp multiplies that default in itself); LongRoPE -> original context + attention factor (the factors
are tensors). Newer families add their llama.cpp keys (``add_family_keys``): Granite's embedding / residual /
attention / logit scales, Gemma 2's soft-capping, gemma2/gemma3's sliding window and gemma3's
``rope.freq_base_swa``; ``rope.dimension_count`` is the rotary width. The tokenizer keys come from
``GgufTokenizer.add_to``.

The file is written under a temporary name and renamed into place, so the model is never in memory as a
whole and no half-written file is ever seen.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sovpack import __version__
from sovpack._digests import HashingWriter
from sovpack._io import Progress
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.gguf.arch import ArchPlan
from sovpack.targets.gguf.runtime import import_gguf
from sovpack.targets.gguf.tensors import TensorJob, encode, storage_type, tensor_nbytes, tensor_plan
from sovpack.targets.gguf.vocab import GgufTokenizer

# The precisions gguf-py writes itself (the K-quants are llama.cpp's, see ``quantize``).
GGUF_PRECISIONS = ("f32", "f16", "bf16", "q8_0", "q4_0")

SOURCE_FILE_COUNT = "general.source.file.count"
SOURCE_FILE_KEY = "general.source.file.{id}.{field}"  # field: path, sha256, size


@dataclass(slots=True)
class WriteStats:
    """What the writer chose: tensors per GGML type, and tensors stored at another type than asked (why)."""

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
) -> WriteStats:
    """Stream the model into ``path`` (via a temporary sibling) at a gguf-py precision."""
    gguf = import_gguf()
    jobs = tensor_plan(model, plan)
    file_type = FILE_TYPES[precision]

    def add_kv(writer: Any) -> None:
        add_metadata(writer, model, tok, getattr(gguf.LlamaFileType, file_type), plan)

    arch_name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[plan.arch]]
    return stream_gguf(model, arch_name, jobs, add_kv, precision, path, progress)


# gguf.LlamaFileType member of each gguf-py precision
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
}


def stream_gguf(
    model: SourceModel,
    arch_name: str,
    jobs: list[TensorJob],
    add_kv: Callable[[Any], None],
    precision: str,
    path: Path,
    progress: Progress,
) -> WriteStats:
    """Write a GGUF file of llama.cpp architecture ``arch_name``: the key-values ``add_kv`` adds, then the
    tensors of ``jobs`` streamed one at a time at ``precision`` (decoders and encoders share this)."""
    gguf = import_gguf()
    stats = WriteStats()
    writer = gguf.GGUFWriter(path=None, arch=arch_name)
    add_kv(writer)
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
        # NOTE: gguf-py opens its own output file unless one is already open in state EMPTY; ours hashes every
        # byte as written (header, key-values, tensor infos, data), so the bundle stores the file without a
        # second read. The file is only ever appended to (gguf-py's single-file path never seeks).
        writer.fout = [HashingWriter(tmp)]
        writer.state = gguf.WriterState.EMPTY
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for n, (job, qtype) in enumerate(zip(jobs, chosen, strict=True)):
            progress(f"gguf {precision}: {job.name}", n, len(jobs))
            write_tensor_chunks(writer, job.name, tensor_nbytes(job.shape, qtype), encode(job, qtype, model))
        progress(f"gguf {precision}", len(jobs), len(jobs))
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):  # cleanup only: the original error is what the caller needs
            tmp.unlink()
        raise
    return stats


def write_tensor_chunks(writer: Any, name: str, nbytes: int, chunks: Iterator[np.ndarray]) -> None:
    """Write the next tensor's data as it is encoded, chunk by chunk, so no whole tensor is ever in memory.

    NOTE: this is gguf-py's ``GGUFWriter.write_tensor_data`` (single output file, native byte order) made to
    take a stream: it pops the tensor's info in file order, aligns, writes the chunks and pads. The byte count
    is checked against the header's, so a change in gguf-py's bookkeeping fails loudly rather than silently.
    """
    gguf = import_gguf()
    if writer.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS) or len(writer.fout) != 1:
        raise ConversionError(f"gguf-py writer is not ready for tensor data ({writer.state})")
    fout = writer.fout[0]
    expected = next(iter(writer.tensors[0]))
    info = writer.tensors[0].pop(expected)
    if expected != name or info.nbytes != nbytes:
        raise ConversionError(f"gguf tensor order: writing {name} ({nbytes} bytes) where {expected} is next")
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        fout.write(np.ascontiguousarray(chunk))
        written += chunk.nbytes
    if written != nbytes:
        raise ConversionError(f"{name}: wrote {written} bytes, expected {nbytes}")
    writer.write_padding(fout, written)
    writer.state = gguf.WriterState.WEIGHTS


def read_tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF file holds (reads the header only)."""
    gguf = import_gguf()
    reader = gguf.GGUFReader(path)
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def add_metadata(writer: Any, model: SourceModel, tok: GgufTokenizer, file_type: Any, plan: ArchPlan) -> None:
    """Every key-value of the file: general.*, source digests, hyperparameters, RoPE scaling, tokenizer."""
    gguf = import_gguf()
    spec = model.spec
    add_general(writer, model, file_type)
    writer.add_vocab_size(spec.vocab_size)
    # llama.cpp's llama / phi3 / smollm3 graphs do not apply a sliding window: advertise only the context where
    # the file computes what the source does (frontends default their context to this).
    writer.add_context_length(context_length(spec, plan))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    moe = spec.moe if plan.moe is not None else None
    if moe is not None and plan.moe is not None and plan.moe.width_key == "feed_forward_length":
        writer.add_feed_forward_length(moe.expert_intermediate_size)  # llama sizes ffn_*_exps by n_ff
    else:
        writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.rotary_size)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    add_family_keys(writer, spec, plan)
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
    elif s.kind == "longrope":
        # llama.cpp reads the factors from rope_factors_long / _short and picks one set by its context size;
        # the cos/sin multiplier is the attention factor, already resolved in the spec.
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings or spec.max_position_embeddings)
        writer.add_rope_scaling_attn_factors(1.0 if s.attention_factor is None else s.attention_factor)
    elif s.kind == "llama3":
        # The scaling lives in rope_freqs.weight; the type key stays "none" so nothing is scaled twice.
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    tok.add_to(writer)


def add_general(writer: Any, model: SourceModel, file_type: Any) -> None:
    """general.* (name, type, file type, quantized_by, license) and the source files' digests."""
    gguf = import_gguf()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model.name)
    writer.add_quantized_by(f"sovpack {__version__}")
    writer.add_file_type(int(file_type))
    if file_type not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    license_ = stated_license(model)
    if license_:
        writer.add_license(license_)
    files = model.checkpoint.source_files
    writer.add_uint32(SOURCE_FILE_COUNT, len(files))
    for i, f in enumerate(files):
        writer.add_string(SOURCE_FILE_KEY.format(id=i, field="path"), f.path)
        writer.add_string(SOURCE_FILE_KEY.format(id=i, field="sha256"), f.sha256)
        writer.add_uint64(SOURCE_FILE_KEY.format(id=i, field="size"), f.size)


def stated_license(model: SourceModel) -> str | None:
    """The license the checkpoint states: config.json 'license', else README.md front matter 'license:'."""
    value = model.checkpoint.config.get("license")
    if isinstance(value, str) and value.strip():
        return value.strip()
    readme = model.checkpoint.read_bytes("README.md")  # a regular file within its size cap, or SourceError
    if readme is None:
        return None
    # NOTE: the license key is optional, informative metadata: a README that is not UTF-8 text states no
    # license, and the conversion goes on without the key.
    with contextlib.suppress(UnicodeDecodeError):
        lines = readme.decode("utf-8").splitlines()
        if lines and lines[0].strip() == "---":
            for line in lines[1:]:
                if line.strip() == "---":
                    break
                m = re.match(r"^license:\s*(\S.*?)\s*$", line)
                if m:
                    return m.group(1).strip("'\"")
    return None


def context_length(spec: ModelSpec, plan: ArchPlan) -> int:
    """The context the file advertises: the model's, capped at its sliding window where llama.cpp's architecture
    ignores the window."""
    if spec.sliding_window is not None and plan.swa_period is None:
        return min(spec.max_position_embeddings, spec.sliding_window)
    return spec.max_position_embeddings


def add_family_keys(writer: Any, spec: ModelSpec, plan: ArchPlan) -> None:
    """The keys of the newer architectures: Granite's multipliers, soft-capping, sliding windows, local rope base,
    and the expert counts of mixture-of-experts models."""
    if plan.moe is not None and spec.moe is not None:
        writer.add_expert_count(spec.moe.num_experts)
        writer.add_expert_used_count(spec.moe.experts_per_token)
        if plan.moe.width_key == "expert_feed_forward_length":
            writer.add_expert_feed_forward_length(spec.moe.expert_intermediate_size)
    if plan.multipliers:
        # llama.cpp's granite reads logit_scale (required) and the three others (0 or absent: not applied).
        writer.add_embedding_scale(spec.embedding_multiplier)
        writer.add_residual_scale(spec.residual_multiplier)
        writer.add_attention_scale(
            1.0 / math.sqrt(spec.head_dim) if spec.attention_scale is None else spec.attention_scale
        )
        writer.add_logit_scale(spec.logits_divisor)
    if spec.attn_logit_softcap is not None:
        writer.add_attn_logit_softcapping(spec.attn_logit_softcap)
    if spec.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(spec.final_logit_softcap)
    if plan.swa_period is not None and spec.sliding_window is not None:
        # The layer pattern is llama.cpp's default for the architecture (arch_plan checked it), or, where the
        # arch reads one, the explicit per-layer pattern.
        writer.add_sliding_window(spec.sliding_window)
        if plan.swa_pattern_key:
            writer.add_sliding_window_pattern([spec.layer_window(i) is not None for i in range(spec.num_layers)])
        if plan.local_rope:
            writer.add_rope_freq_base_swa(spec.rope_theta if spec.rope_local_theta is None else spec.rope_local_theta)


def yarn_default_mscale(factor: float) -> float:
    """The attention scale llama.cpp (and HF, by default) applies for a YaRN factor."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
