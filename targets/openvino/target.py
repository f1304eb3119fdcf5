"""The ``openvino`` target: its precision table and the writer of the IR directory; runners in ``runner``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack._io import Progress
from sovpack._protocols import Precision, RunnerTraits, WrittenArtifact
from sovpack.errors import ConversionError, SovpackError, UsageError
from sovpack.parity.thresholds import DEFAULT_THRESHOLDS
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.base import SUPPORT_FILES, TargetRef, copy_support_files, precision_table, register_target
from sovpack.targets.openvino.runner import OpenvinoRunner
from sovpack.targets.openvino.runtime import (
    DETOKENIZER_XML,
    GENERATION_CONFIG,
    MODEL_BIN,
    MODEL_XML,
    PARITY_CONFIG,
    RUNTIME_OPTIONS,
    TOKENIZER_XML,
    require_openvino,
    require_tokenizers,
)

if TYPE_CHECKING:
    from sovpack.artifact import ArtifactMetadata
    from sovpack.quantize import QuantOptions, QuantPlan
    from sovpack.targets.openvino.encoder_runner import OpenvinoEmbeddingRunner


def _row(name: str, weights: str, runtime_bytes_per_weight: float | None = None) -> Precision:
    return Precision(name=name, weights=weights, quantized=weights.startswith("int"),
                     thresholds=DEFAULT_THRESHOLDS[name], runtime_bytes_per_weight=runtime_bytes_per_weight)


# NOTE: what the CPU plugin holds per weight of a 4-bit IR, measured on OpenVINO 2026.4 with the synthetic
# Llama-3-8B (benchmarks/release_size.py; a standalone run of the 5.7 GB IR peaked at 7.9 GB anonymous): it
# repacks the u4 codes into its own buffers and keeps every group's f16 scale and zero point as f32 (8 bytes a
# group of 32: 0.25 a weight), the plan's 8-bit eighth at a byte a weight; the embedding Gather reads the mapped
# file. About 1.0 byte a weight at groups of 32 (the generic 4-bit row's 0.65 would let an 8B model's parity
# run start on a machine it then overflows); groups of 128, the default from 6B parameters, need less, but one
# bound serves both, since ``--group-size 32`` is allowed at any size.
INT4_PLUGIN_BYTES_PER_WEIGHT = 1.0


# One row per scheme in ``weights.SCHEMES``; ``weights`` is the ModelPack precision of the stored matrices.
PRECISION_TABLE = precision_table(
    _row("fp32", "float32"),
    _row("fp16", "float16"),
    _row("int8", "int8"),
    _row("int8_sym", "int8"),
    _row("int4", "int4", INT4_PLUGIN_BYTES_PER_WEIGHT),
    _row("int4_sym", "int4", INT4_PLUGIN_BYTES_PER_WEIGHT),
)
PRECISIONS: tuple[str, ...] = tuple(PRECISION_TABLE)

# NOTE: the graph has no per-family code: it is built from the spec's features (RMSNorm, activation, q/k norms
# per head or projection, biases, per-layer sliding windows, local/global/no rope, partial rotary, RoPE scaling
# incl. longrope, attention scale and soft-cap, pre/post/sandwich norms, residual/embedding multipliers, logits
# divisor and soft-cap), and ``build_model`` refuses a feature it lacks. These are the families whose specs it
# has been checked on end to end at fp32 and fp16, with openvino-genai (tests/targets/test_openvino.py); another
# one is refused.
FAMILIES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma",
    "granite", "olmo2", "smollm3", "gemma2", "gemma3", "phi3_longrope",
    # issue 14: mixture of experts (``moe``: the tiled block the CPU plugin rewrites to routed GatherMatmuls);
    # gpt-oss adds attention sinks, o_bias, expert biases and the clamped SwiGLU
    "qwen3_moe", "mixtral", "gpt_oss",
    # issue 15: embedding encoders (spec.encoder set), written by ``_write_encoder`` (encoder.py: pooling in the
    # graph, so TextEmbeddingPipeline's defaults give the sentence-transformers embeddings)
    "bert", "xlm_roberta",
    # ModernBERT: pre-LN, rope with local/global bases, a two-sided local window, GeGLU (encoder_rope.py)
    "modernbert",
})
# What a caller of openvino-genai's defaults gets (measured on an AMX CPU, tests/targets/test_openvino_defaults.py).
DEFAULTS_NOTE = (
    "rt_info runtime_options give the KV cache and activations parity used; the compute precision is the "
    "device's default: bf16 on AMX / AVX512-BF16 CPUs (OpenVINO reads INFERENCE_PRECISION_HINT from no model), "
    "where greedy tokens can leave the reference's at near-ties; pass INFERENCE_PRECISION_HINT=f32 for parity's "
    "numbers"
)
# Integer schemes an encoder refuses: 4-bit groups are a decoder-size trade (memory bandwidth of billions of
# weights); on a 22M-parameter encoder they cost embedding quality for a few megabytes.
ENCODER_REFUSED = frozenset({"int4", "int4_sym"})


@register_target
class OpenvinoTarget:
    """OpenVINO IR for openvino-genai, built with the OpenVINO graph API."""

    name = "openvino"
    precisions = PRECISION_TABLE
    default_precision = "fp16"
    runtime_packages: tuple[str, ...] = ("openvino", "openvino-tokenizers", "openvino-genai", "nncf")
    families = FAMILIES

    def check_quantization(self, precision: str, options: QuantOptions) -> None:
        """Nothing to refuse: every method, symmetric or not; each tensor takes the largest supported group
        (16-128) <= the requested one that divides it (none: that tensor stays 8-bit, ``weights``)."""

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress, *,
              quant: QuantOptions | None = None) -> WrittenArtifact:
        """Write the IR directory; ``quant`` (None: ``QuantOptions()``) drives the 4-bit precisions only."""
        if precision not in self.precisions:
            raise UsageError(f"target 'openvino' has no precision {precision!r}; known: {', '.join(PRECISIONS)}")
        TargetRef(format=self.name, precision=precision).check_family(model.spec)
        if model.spec.encoder is not None:
            from sovpack.targets.openvino.encoder_writer import write_encoder

            if precision in ENCODER_REFUSED:
                raise ConversionError(
                    f"openvino:{precision} is not offered for embedding encoders ({model.spec.family}): 4-bit weight "
                    "groups trade embedding quality for a few megabytes on a model this small; use openvino:int8 "
                    "(or fp16/fp32)")
            return write_encoder(model, precision, Path(out_dir), progress, _save_model)
        ov = require_openvino()
        openvino_tokenizers = require_tokenizers()
        from sovpack import __version__
        from sovpack.targets.openvino.graph import INPUT_NAMES, OUTPUT_NAME, build_model, state_names
        from sovpack.targets.openvino.precise import mark_fp16_decompression
        from sovpack.targets.openvino.weights import SCHEMES, counted_weights

        scheme = SCHEMES[precision]
        out = Path(out_dir)
        plan = plan_int4(model, precision, quant, progress)
        weights, weights_written = counted_weights(model, precision, progress, plan)
        graph = build_model(model.spec, weights)
        for key, value in (("sovpack_version", __version__), ("precision", precision),
                           ("family", model.spec.family), ("architecture", model.spec.architecture)):
            graph.set_rt_info(str(value), ["sovpack", key])
        for key, value in RUNTIME_OPTIONS.items():  # what openvino-genai's defaults then apply (runtime.py)
            graph.set_rt_info(value, ["runtime_options", key])
        _save_model(ov, graph, out / MODEL_XML)
        del graph
        fp16 = scheme.kind == "float" and scheme.float_dtype == np.float16
        marked = mark_fp16_decompression(out / MODEL_XML) if fp16 else 0
        weights_written()

        files = [MODEL_XML, MODEL_BIN]
        tokenizer_info = _write_tokenizer(ov, model, out, files)
        files.extend(_write_support_files(model, out))

        stats = weights.stats
        format_metadata: dict[str, Any] = {
            "openvino_version": ov.get_version(),
            "openvino_tokenizers_version": openvino_tokenizers.__version__,
            "precision": precision,
            "weights": {
                "scheme": precision,
                "tensors": stats.tensors,
                "float_tensors": stats.float_tensors,
                "float_dtype": "f16" if precision == "fp16" else "f32",
                "int8_tensors": stats.int8_layers,
                "int4_tensors": stats.int4_layers,
                "int4_group_sizes": sorted(stats.group_sizes),
                "symmetric": (plan.options.symmetric if plan is not None
                              else scheme.symmetric if scheme.kind == "int" else None),
                "int4_zero_point": (None if plan is None or plan.options.symmetric
                                    else "u4" if plan.integer_zero else "f16"),
                "fp16_decompression_marked": marked,
            },
            # the 4-bit recipe (sovpack.quantize.QuantPlan.to_dict); None: no plan (other precisions, MoE's
            # round-to-nearest groups)
            "quantization": plan.to_dict() if plan is not None else None,
            "inputs": list(INPUT_NAMES),
            "outputs": [OUTPUT_NAME],
            "kv_cache": {
                "kind": "stateful (ReadValue/Assign), reordered by beam_idx",
                "layout": "[batch, kv_heads, seq, head_dim]",
                "dtype": "f32",
                "variables": [name for i in range(model.spec.num_layers) for name in state_names(i)],
            },
            "tokenizer": tokenizer_info,
            "parity_compile_config": dict(PARITY_CONFIG),
            "runtime_options": dict(RUNTIME_OPTIONS),
            "compute_precision_at_defaults": DEFAULTS_NOTE,
            "notes": _notes(model.spec),
        }
        # OpenVINO with PARITY_CONFIG has no known deviations to excuse: the runner judges at the defaults.
        return WrittenArtifact(files=tuple(files), format_metadata=format_metadata, traits=RunnerTraits())

    def open_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> OpenvinoRunner:
        return OpenvinoRunner(Path(artifact_dir), metadata)

    def open_embedding_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> OpenvinoEmbeddingRunner:
        from sovpack.targets.openvino.encoder_runner import OpenvinoEmbeddingRunner

        return OpenvinoEmbeddingRunner(Path(artifact_dir), metadata)


def _notes(spec: ModelSpec) -> list[str]:
    """What openvino-genai does differently with this artifact than the parity runner (one sequence, stateful)."""
    notes = []
    if spec.attn_logit_softcap is not None:
        notes.append(
            "attention soft-capping is built from MatMul/Tanh/Softmax (ScaledDotProductAttention has no soft-cap): "
            "openvino-genai's paged-attention backend (ATTENTION_BACKEND=PA, ContinuousBatchingPipeline) refuses "
            "the model; LLMPipeline's default falls back to the stateful backend, which parity checked"
        )
    if spec.moe is not None:
        notes.append(
            "mixture of experts: the tiled MoE block (Tile, batched MatMuls over stacked experts, routing weights "
            "scattered to [tokens, experts]) that OpenVINO's CPU plugin rewrites into GatherMatmul, computing only "
            "each token's top-k experts; elsewhere it runs as a dense all-experts computation with the same result"
        )
    if spec.rope_scaling.kind == "longrope":
        notes.append(
            "longrope's long factors apply when the largest position id of a forward pass over the whole batch + 1 "
            f"exceeds {spec.rope_scaling.original_max_position_embeddings} (as transformers does); sequences "
            "batched together (batched generate, continuous batching) share that switch"
        )
    return notes


def _save_model(ov: Any, graph: Any, path: Path) -> None:
    """``ov.save_model`` without fp16 compression; a failure is a ConversionError, or a weight maker's own
    SovpackError (e.g. the SourceError of NaN in the checkpoint)."""
    try:
        ov.save_model(graph, path, compress_to_fp16=False)
    except SovpackError:
        raise
    except Exception as e:  # broad: a failing weight maker surfaces as whatever the binding wraps it in
        cause = e.__cause__ or e.__context__
        if isinstance(cause, SovpackError):
            raise cause from e
        raise ConversionError(f"{path}: writing the OpenVINO IR failed: {e}") from e


def _write_tokenizer(ov: Any, model: SourceModel, out: Path, files: list[str]) -> dict[str, Any]:
    """openvino_tokenizer/detokenizer IRs converted from tokenizer.json; returns their format metadata."""
    from sovpack.targets.openvino.tokenizer import convert_tokenizer

    checkpoint = model.checkpoint
    if checkpoint.tokenizer_json is None:
        return {"converted": False, "reason": "the checkpoint has no tokenizer.json"}
    spec = model.spec
    tokenizer, detokenizer = convert_tokenizer(
        checkpoint.tokenizer_json,
        checkpoint.tokenizer_config,
        chat_template=checkpoint.chat_template,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_ids[0] if spec.eos_token_ids else None,
        pad_token_id=spec.pad_token_id,
    )
    _save_model(ov, tokenizer, out / TOKENIZER_XML)
    _save_model(ov, detokenizer, out / DETOKENIZER_XML)
    for xml in (TOKENIZER_XML, DETOKENIZER_XML):
        files.append(xml)
        if (out / xml).with_suffix(".bin").is_file():
            files.append(str(Path(xml).with_suffix(".bin")))
    return {
        "converted": True,
        "route": "tokenizer.json -> openvino_tokenizers pipeline steps (no transformers)",
        "chat_template": checkpoint.chat_template is not None,
    }


def _write_support_files(model: SourceModel, out: Path) -> list[str]:
    """The checkpoint's tokenizer/config files, and a generation_config.json that always names the stop ids."""
    copied = copy_support_files(model, out, [n for n in SUPPORT_FILES if n != GENERATION_CONFIG])
    spec = model.spec
    generation = dict(model.checkpoint.generation_config or {})
    if generation.get("eos_token_id") is None and spec.eos_token_ids:
        ids = list(spec.eos_token_ids)
        generation["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    if generation.get("bos_token_id") is None and spec.bos_token_id is not None:
        generation["bos_token_id"] = spec.bos_token_id
    if generation.get("pad_token_id") is None and spec.pad_token_id is not None:
        generation["pad_token_id"] = spec.pad_token_id
    text = json.dumps(generation, indent=2, sort_keys=True) + "\n"
    (out / GENERATION_CONFIG).write_text(text, encoding="utf-8")
    return [*copied, GENERATION_CONFIG]


def plan_int4(model: SourceModel, precision: str, quant: QuantOptions | None, progress: Progress
              ) -> QuantPlan | None:
    """The 4-bit plan of a dense decoder at ``precision`` (None for other precisions and for MoE checkpoints).

    ``int4_sym`` forces symmetric groups whatever ``quant`` says; ``int4`` follows ``quant.symmetric``. Zero
    points are floats in f16 (``integer_zero=False``): the CPU plugin keeps that pattern compressed (module
    NOTE), and a group's range need not be a multiple of its step.
    """
    import dataclasses

    from sovpack.quantize import QuantOptions, plan_quantization
    from sovpack.targets.openvino.weights import SCHEMES, planned_group_chooser

    scheme = SCHEMES[precision]
    if scheme.kind != "int" or scheme.bits != 4 or model.spec.moe is not None or model.spec.encoder is not None:
        return None
    options = quant if quant is not None else QuantOptions()
    if scheme.symmetric and not options.symmetric:
        options = dataclasses.replace(options, symmetric=True)
    preferred = options.group_size_for(model.spec.parameter_count())
    return plan_quantization(model, options, planned_group_chooser(preferred), scale_dtype=np.float16,
                             integer_zero=False, progress=progress, label=f"openvino:{precision}: quantization plan")
