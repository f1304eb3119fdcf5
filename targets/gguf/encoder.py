"""Embedding encoders as llama.cpp's ``bert`` (BERT, XLM-RoBERTa) and ``modern-bert`` (ModernBERT)
architectures: keys, tensors, the writer.

llama.cpp's BERT graph: word + position (+ token-type row 0) embeddings, LayerNorm (``token_embd_norm``), then
per layer bidirectional attention (``attn_q/k/v``, ``attn_output``, all with biases), ``attn_output_norm``, a GELU
MLP (``ffn_up``/``ffn_down`` with biases) and ``layer_output_norm``: the post-LN layer of EncoderSpec. Keys:
``bert.attention.causal`` = false, ``bert.pooling_type`` (llama.cpp's enum: mean / cls / last),
``bert.attention.layer_norm_epsilon``, ``bert.context_length`` = the position rows in the file,
``tokenizer.ggml.token_type_count``.

XLM-RoBERTa numbers positions from ``padding_idx + 1``; llama.cpp counts from 0, so the file's
``position_embd`` drops the first ``position_offset`` rows, as llama.cpp's converter does. llama.cpp always adds
token-type row 0, which is what the reference adds for a single text.

ModernBERT -> llama.cpp's ``modern-bert`` graph: ``token_embd`` and ``token_embd_norm``, then per layer
``attn_norm`` (absent on layer 0, which llama.cpp then skips), fused ``attn_qkv`` (q, k, v rows), NEOX rope
(rotate-half over the whole head, so q/k rows keep the source's order) with ``rope.freq_base`` on global and
``rope.freq_base_swa`` on local layers, ``attn_output``, ``ffn_norm``, a GeGLU MLP whose ``ffn_up`` is [up; gate]
(ggml_geglu activates the first half and multiplies by the second) and ``ffn_down``, then ``output_norm``. Local
layers: ``attention.sliding_window`` with llama.cpp's symmetric rule (masked when |i - j| > n_swa / 2, so
n_swa = 2 * local_window) and ``attention.sliding_window_pattern`` as one bool per layer. The graph has no
biases on linears or norms: ModernBERT checkpoints with attention_bias / norm_bias are refused.

Pooling: mean, cls and last_token map to llama.cpp's pooling types; max and mean_sqrt_len have none and are
refused. llama.cpp returns the pooled vector unnormalised: the artifact metadata records whether the pipeline
L2-normalises (``normalize``), the runner applies it, and Llama.embed users pass ``normalize=True``.

Precisions: f32, f16 and q8_0 (the encoder "int8": every matrix, word embeddings included, in 8-bit blocks;
llama.cpp also rounds activations to 8 bits inside those matmuls). The position and token-type tables and all
1-D tensors stay F32, as llama.cpp's converter keeps them. 4-bit and K-quant files are refused for encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress
from sovpack._protocols import RunnerTraits, WrittenArtifact
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import EncoderSpec, ModelSpec
from sovpack.targets.base import copy_support_files
from sovpack.targets.gguf.encoder_tokenizer import encoder_tokenizer
from sovpack.targets.gguf.runtime import import_gguf
from sovpack.targets.gguf.tensors import TensorJob, row_blocks
from sovpack.targets.gguf.vocab import DivergenceRule, GgufTokenizer
from sovpack.targets.gguf.writer import FILE_TYPES, add_general, stream_gguf

ENCODER_FAMILIES = frozenset({"bert", "xlm_roberta", "modernbert"})
ENCODER_PRECISIONS = ("f32", "f16", "q8_0")
ARCH = "bert"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]
MODERN_ARCH = "modern-bert"  # gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MODERN_BERT]
# Families on llama.cpp's modern-bert graph (pre-LN, rope, GeGLU); every other encoder family is bert.
MODERN_FAMILIES = frozenset({"modernbert"})
# sentence-transformers pooling mode -> gguf.PoolingType member; max / mean_sqrt_len have no llama.cpp pooling.
POOLING_TYPES = {"mean": "MEAN", "cls": "CLS", "last_token": "LAST"}
# Files of the sentence-transformers pipeline that ride along (``sovpack run``, provenance); llama.cpp reads none.
PIPELINE_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def check_encoder(spec: ModelSpec, precision: str) -> EncoderSpec:
    """The spec's EncoderSpec if llama.cpp's bert / modern-bert computes it at ``precision``; else ConversionError."""
    enc = spec.encoder
    where = f"{spec.family} ({spec.architecture})"
    if enc is None or spec.family not in ENCODER_FAMILIES:
        raise ConversionError(f"{where}: not an embedding encoder llama.cpp's bert architecture runs")
    if precision not in ENCODER_PRECISIONS:
        raise ConversionError(
            f"{where}: gguf precision {precision!r} is not offered for embedding encoders (only "
            f"{', '.join(ENCODER_PRECISIONS)}): 4-bit / K-quant encoders are not parity-checked, and llama.cpp's "
            "K-quants need 256-wide rows most encoders lack"
        )
    mode = enc.pooling.mode
    if mode not in POOLING_TYPES:
        raise ConversionError(
            f"{where}: {mode} pooling has no llama.cpp pooling type (it has mean, cls, last); the artifact would "
            "not produce the model's embeddings"
        )
    if not enc.pooling.include_prompt:
        raise ConversionError(
            f"{where}: pooling without the prompt tokens (include_prompt=false) has no llama.cpp equivalent"
        )
    arch = encoder_arch(spec)
    if spec.activation != "gelu":
        raise ConversionError(f"{where}: activation {spec.activation!r}; llama.cpp's {arch} runs GELU")
    if spec.num_kv_heads != spec.num_heads:
        raise ConversionError(f"{where}: grouped key/value heads; llama.cpp's {arch} has one K/V head per head")
    if arch == MODERN_ARCH:
        check_modern(enc, where)
    if enc.position_offset >= spec.max_position_embeddings:
        raise ConversionError(f"{where}: positions start at {enc.position_offset}, past the position table")
    return enc


def encoder_arch(spec: ModelSpec) -> str:
    """The llama.cpp architecture the family's encoder becomes: ``modern-bert`` or ``bert``."""
    return MODERN_ARCH if spec.family in MODERN_FAMILIES else ARCH


def check_modern(enc: EncoderSpec, where: str) -> None:
    """ConversionError unless llama.cpp's modern-bert graph computes this EncoderSpec."""
    if enc.linear_bias or enc.norm_bias:
        which = " and ".join(n for n, on in (("linear_bias", enc.linear_bias), ("norm_bias", enc.norm_bias)) if on)
        raise ConversionError(
            f"{where}: {which}=True (attention_bias / mlp_bias / norm_bias); llama.cpp's modern-bert graph has "
            "no biases on its linears or norms, so the file would not compute the model"
        )
    shape = (enc.layout, enc.position, enc.mlp, enc.type_vocab_size, enc.position_offset)
    if shape != ("pre_ln", "rope", "geglu", 0, 0):
        raise ConversionError(
            f"{where}: layout {enc.layout}, {enc.position} positions, {enc.mlp} MLP, {enc.type_vocab_size} token "
            "types; llama.cpp's modern-bert computes pre-LN, rope, GeGLU and no token types"
        )
    if enc.local_layers and not enc.local_window:
        raise ConversionError(f"{where}: local layers {list(enc.local_layers)} without a local window")


def positions(spec: ModelSpec) -> int:
    """Position rows in the file (llama.cpp's n_ctx_train): the table after the first ``position_offset`` rows."""
    assert spec.encoder is not None
    return spec.max_position_embeddings - spec.encoder.position_offset


def encoder_tensor_plan(model: SourceModel) -> list[TensorJob]:
    """Every tensor of the bert-architecture file, in llama.cpp's converter order, read on demand."""
    if encoder_arch(model.spec) == MODERN_ARCH:
        return modern_tensor_plan(model)
    gguf = import_gguf()
    t = gguf.MODEL_TENSOR
    spec = model.spec
    enc = spec.encoder
    assert enc is not None
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.BERT])
    shapes = spec.tensor_shapes()
    jobs: list[TensorJob] = []

    def name(kind: Any, suffix: str, bid: int | None = None) -> str:
        if kind not in allowed:  # pragma: no cover - gguf-py's table is what llama.cpp loads
            raise ConversionError(f"llama.cpp's bert architecture has no tensor {kind.name}")
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    def add(gguf_name: str, canonical: str, *, f32: bool = False) -> None:
        jobs.append(
            TensorJob(name=gguf_name, shape=shapes[canonical], blocks=lambda: row_blocks(model, canonical), f32=f32)
        )

    # NOTE: position and token-type tables stay F32 at every precision, as llama.cpp's converter keeps them:
    # its BERT graph adds the token-type row with ggml_add, which has no f32 + f16 kernel on the CPU.
    offset = enc.position_offset

    def position_rows() -> Any:
        # NOTE: the table is [positions, hidden] (2 MB for 512 x 1024 f32): read whole, rows sliced.
        yield model.tensor("pos_embed", np.float32)[offset:]

    add(name(t.TOKEN_EMBD, "weight"), "embed")
    if enc.type_vocab_size:
        add(name(t.TOKEN_TYPES, "weight"), "type_embed", f32=True)
    jobs.append(
        TensorJob(
            name=name(t.POS_EMBD, "weight"), shape=(positions(spec), spec.hidden_size), blocks=position_rows, f32=True
        )
    )
    add(name(t.TOKEN_EMBD_NORM, "weight"), "embed_norm")
    add(name(t.TOKEN_EMBD_NORM, "bias"), "embed_norm_bias")
    per_layer = (
        (t.ATTN_Q, "q"),
        (t.ATTN_K, "k"),
        (t.ATTN_V, "v"),
        (t.ATTN_OUT, "o"),
        (t.ATTN_OUT_NORM, "attn_output_norm"),
        (t.FFN_UP, "up"),
        (t.FFN_DOWN, "down"),
        (t.LAYER_OUT_NORM, "output_norm"),
    )
    for i in range(spec.num_layers):
        for kind, canonical in per_layer:
            add(name(kind, "weight", i), f"layers.{i}.{canonical}")
            add(name(kind, "bias", i), f"layers.{i}.{canonical}_bias")
    return jobs


def modern_tensor_plan(model: SourceModel) -> list[TensorJob]:
    """Every tensor of the modern-bert file, read on demand: q/k/v and up/gate streamed into their fused rows."""
    gguf = import_gguf()
    t = gguf.MODEL_TENSOR
    spec = model.spec
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.MODERN_BERT])
    shapes = spec.tensor_shapes()
    jobs: list[TensorJob] = []

    def add(kind: Any, parts: tuple[str, ...], bid: int | None = None) -> None:
        if kind not in allowed:  # pragma: no cover - gguf-py's table is what llama.cpp loads
            raise ConversionError(f"llama.cpp's modern-bert architecture has no tensor {kind.name}")
        base = gguf.TENSOR_NAMES[kind]
        name = (base.format(bid=bid) if bid is not None else base) + ".weight"
        first = shapes[parts[0]]
        shape = (sum(shapes[p][0] for p in parts), *first[1:])
        jobs.append(TensorJob(name=name, shape=shape, blocks=lambda: (b for p in parts for b in row_blocks(model, p))))

    add(t.TOKEN_EMBD, ("embed",))
    add(t.TOKEN_EMBD_NORM, ("embed_norm",))
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        if p + "attn_norm" in shapes:  # layer 0 has none: llama.cpp then feeds the layer input unnormalised
            add(t.ATTN_NORM, (p + "attn_norm",), i)
        add(t.ATTN_QKV, (p + "q", p + "k", p + "v"), i)
        add(t.ATTN_OUT, (p + "o",), i)
        add(t.FFN_NORM, (p + "mlp_norm",), i)
        # NOTE: ggml_geglu (llama.cpp's LLM_FFN_GEGLU, not swapped) applies GELU to the first half of ffn_up's
        # output and multiplies by the second: [up; gate], the order of ModernBERT's Wi.
        add(t.FFN_UP, (p + "up", p + "gate"), i)
        add(t.FFN_DOWN, (p + "down",), i)
    add(t.OUTPUT_NORM, ("final_norm",))
    return jobs


def add_modern_keys(writer: Any, enc: EncoderSpec, spec: ModelSpec) -> None:
    """modern-bert's rope bases, local window and layer pattern, and its MLP activation."""
    gguf = import_gguf()
    writer.add_rope_freq_base(enc.rope_theta)
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    # llama.cpp's modern-bert reads <arch>.hidden_activation ("gelu" -> GeGLU); gguf-py has no writer method.
    writer.add_string(f"{MODERN_ARCH}.hidden_activation", "gelu")
    if enc.local_layers and enc.local_window:  # check_modern refuses local layers without a window
        # NOTE: llama.cpp's LLAMA_SWA_TYPE_SYMMETRIC masks keys with |i - j| > n_swa / 2 (integer halving), the
        # reference keeps |i - j| <= local_window: n_swa = 2 * local_window makes them the same set.
        writer.add_sliding_window(2 * enc.local_window)
        writer.add_sliding_window_pattern([i in enc.local_layers for i in range(spec.num_layers)])
        writer.add_rope_freq_base_swa(enc.rope_local_theta)


def add_encoder_metadata(writer: Any, model: SourceModel, tok: GgufTokenizer, file_type: Any) -> None:
    """general.*, the bert / modern-bert hyperparameters, pooling and the tokenizer."""
    gguf = import_gguf()
    spec = model.spec
    enc = spec.encoder
    assert enc is not None
    add_general(writer, model, file_type)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_context_length(positions(spec))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_feed_forward_length(spec.intermediate_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_layer_norm_eps(spec.norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType[POOLING_TYPES[enc.pooling.mode]])
    if encoder_arch(spec) == MODERN_ARCH:
        add_modern_keys(writer, enc, spec)
    tok.add_to(writer)


def truncation_rule(model: SourceModel) -> DivergenceRule:
    """Texts longer than max_seq_length: Llama.embed keeps their first tokens and drops the final separator,
    where sentence-transformers (the source) cuts the text and keeps it."""
    from sovpack.parity.embeddings import max_input_length
    from sovpack.source.tokenizer import SourceTokenizer

    limit = max_input_length(model)
    path = model.checkpoint.tokenizer_json
    source = SourceTokenizer(path) if path is not None else None
    return DivergenceRule(
        rule="truncation",
        description=f"texts over {limit} tokens: llama.cpp's Llama.embed drops the tail including the final "
        "separator; sentence-transformers keeps the separator",
        applies=lambda text: source is not None and len(source.encode(text)) > limit,
    )


def write_encoder(model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> WrittenArtifact:
    """Write an embedding encoder's .gguf (and its tokenizer / pipeline files) into ``out_dir``."""
    gguf = import_gguf()
    from sovpack.parity.embeddings import ENCODER_TOKENIZER_CORPUS

    spec = model.spec
    enc = check_encoder(spec, precision)
    tok = encoder_tokenizer(
        model.checkpoint,
        vocab_size=spec.vocab_size,
        type_vocab_size=enc.type_vocab_size,
        pad_id=spec.pad_token_id,
        corpus=ENCODER_TOKENIZER_CORPUS,
    )
    tok.divergences.append(truncation_rule(model).known(ENCODER_TOKENIZER_CORPUS))
    filename = f"{model.name}-{precision}.gguf"
    out = Path(out_dir) / filename
    file_type = getattr(gguf.LlamaFileType, FILE_TYPES[precision])
    arch = encoder_arch(spec)
    stats = stream_gguf(
        model,
        arch,
        encoder_tensor_plan(model),
        lambda writer: add_encoder_metadata(writer, model, tok, file_type),
        precision,
        out,
        progress,
    )
    support = copy_support_files(model, Path(out_dir))
    for name in PIPELINE_FILES:
        if model.checkpoint.file(name) is not None:
            (Path(out_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            support += copy_support_files(model, Path(out_dir), (name,))
    pooling = enc.pooling
    format_metadata: dict[str, Any] = {
        "gguf_file": filename,
        "architecture": arch,
        "encoder": True,
        "pooling": pooling.mode,
        "llama_pooling_type": POOLING_TYPES[pooling.mode].lower(),
        "normalize": pooling.normalize,
        "max_seq_length": pooling.max_seq_length,
        "position_offset": enc.position_offset,
        "quantizer": "gguf-py",
        "tensor_types": dict(sorted(stats.types.items())),
        "fallbacks": stats.fallbacks,
        "tokenizer": tok.summary(),
        "notes": encoder_notes(spec, precision),
    }
    traits = RunnerTraits(parity_limits=encoder_parity_limits(precision),
                          known_tokenizer_divergences=tuple(tok.divergent_texts))
    return WrittenArtifact(files=(filename, *support), format_metadata=format_metadata, traits=traits)


def encoder_parity_limits(precision: str) -> dict[str, float]:
    """Token-state limits llama.cpp cannot meet: its float16-table tanh GELU moves the f32 token states by
    1.4e-3 - 4.2e-3 (fixtures, all-MiniLM-L6-v2; the same table in modern-bert's GeGLU: 1.6e-3 on the
    modernbert fixture) against fp32's 1e-3; 1e-2 is ~2.5x that. Embedding cosines stay within the defaults
    (1 - cos <= 1e-6)."""
    return {"max_hidden_abs": 1e-2} if precision == "f32" else {}


def encoder_notes(spec: ModelSpec, precision: str) -> list[str]:
    """What a user of the file must know to get the model's embeddings out of llama.cpp."""
    enc = spec.encoder
    assert enc is not None
    p = enc.pooling
    arch = encoder_arch(spec)
    notes = [
        f"llama.cpp pools the token states itself ({p.mode} -> {arch}.pooling_type "
        f"{POOLING_TYPES[p.mode].lower()}) and returns the pooled vector unnormalised",
        f"llama.cpp's {'GeGLU' if arch == MODERN_ARCH else 'GELU'} is the tanh approximation read from a float16 "
        "table; the source uses the exact (erf) GELU: parity measures the difference",
    ]
    if arch == MODERN_ARCH and enc.local_layers and enc.local_window is not None:
        notes.append(
            f"local layers {list(enc.local_layers)} attend within {enc.local_window} positions on either side "
            f"(sliding_window {2 * enc.local_window}, llama.cpp's symmetric window masks beyond half of it) with "
            f"rope base {enc.rope_local_theta:g}; global layers use {enc.rope_theta:g}"
        )
    if p.normalize:
        notes.append(
            "the sentence-transformers pipeline L2-normalises (Normalize module): the runner does, and users of "
            "llama-cpp-python must call Llama.embed(..., normalize=True)"
        )
    if p.max_seq_length is not None:
        notes.append(
            f"the pipeline truncates inputs to {p.max_seq_length} tokens keeping the final [SEP]/</s>; the runner "
            f"opens llama.cpp with n_batch={min(p.max_seq_length, positions(spec))}, and Llama.embed truncates to "
            "n_batch by dropping the tail (the final separator included): over-long texts differ there"
        )
    if enc.position_offset:
        notes.append(
            f"positions start at {enc.position_offset} in the source (XLM-RoBERTa's padding_idx + 1): the file's "
            "position_embd omits the first rows, as llama.cpp's own converter does"
        )
    if enc.type_vocab_size > 1:
        notes.append("llama.cpp adds token-type row 0 to every token (single-text embeddings, as the pipeline does)")
    return notes
