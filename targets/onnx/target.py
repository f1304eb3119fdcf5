"""The ``onnx`` target: its precision table, the artifact writer, and the runner it opens."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack._io import Progress, read_json_file
from sovpack._protocols import Precision, RunnerTraits, WrittenArtifact
from sovpack.errors import ConversionError, SourceError
from sovpack.quantize import QuantOptions, QuantPlan, plan_quantization
from sovpack.source.model import SourceModel
from sovpack.targets.base import copy_support_files, register_target
from sovpack.targets.onnx.deps import require
from sovpack.targets.onnx.encoder import ENCODER_OUTPUTS, EncoderBuilder, encoder_inputs
from sovpack.targets.onnx.encoder_runner import OnnxEmbeddingRunner
from sovpack.targets.onnx.external_data import DATA_FILE
from sovpack.targets.onnx.genai import (
    GENAI_CONFIG,
    GENAI_MODEL_TYPES,
    genai_config,
    genai_model_type,
    genai_notes,
)
from sovpack.targets.onnx.graph import MODEL_FILE, BuiltModel, DecoderBuilder
from sovpack.targets.onnx.precisions import PRECISIONS, min_onnxruntime, plan_for
from sovpack.targets.onnx.quantize import QUANT_BLOCK_SIZE, group_chooser
from sovpack.targets.onnx.runner import OnnxRunner

if TYPE_CHECKING:
    from sovpack.artifact import ArtifactMetadata

# Embedding-encoder families (spec.encoder set): written as the feature-extraction graph of encoder.py.
ENCODER_FAMILIES = frozenset({"bert", "xlm_roberta", "modernbert"})
# The sentence-transformers files that say how token states become the embedding, copied beside the graph.
MODULES_JSON_CAP = 1024 * 1024
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


@register_target
class OnnxTarget:
    """ONNX Runtime / onnxruntime-genai artifacts at fp32, fp16 (fp16 weights, fp32 compute), int8, int4.

    Mixture-of-experts layers run as onnxruntime's MoE (fp32, fp16) or QMoE (int8, int4) operator (moe.py)."""

    name = "onnx"
    precisions: Mapping[str, Precision] = PRECISIONS
    default_precision = "fp32"
    runtime_packages: tuple[str, ...] = ("onnx", "onnxruntime", "onnxruntime-genai")
    # Every family onnxruntime-genai has a decoder type for (the graph itself covers all of them), and the
    # embedding encoders (encoder.py; int4 refused for them).
    families: frozenset[str] = frozenset(GENAI_MODEL_TYPES) | ENCODER_FAMILIES

    def check_quantization(self, precision: str, options: QuantOptions) -> None:
        """Nothing to refuse: every method, symmetric or not; each tensor takes the requested block size or the
        largest smaller power of two >= 16 that divides it (none: that tensor stays 8-bit, ``quantize``)."""

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress, *,
              quant: QuantOptions | None = None) -> WrittenArtifact:
        """Write the artifact; ``quant`` steers int4 (sovpack.quantize's plan), the other precisions ignore it."""
        if model.spec.encoder is not None:
            return self._write_encoder(model, precision, out_dir, progress)
        plan = plan_for(precision)
        genai_type = genai_model_type(model.spec)
        quantizer_version = require("onnxruntime").__version__ if plan.bits is not None else None
        # NOTE: mixture-of-experts models keep onnxruntime's RTN for every projection: their experts are QMoE
        # weights (moe.py) the plan does not pack, and a plan measured over them would spend its 8-bit share
        # on tensors the file does not store at 8 bits.
        options = quant or QuantOptions()
        block_size = options.group_size_for(model.spec.parameter_count())
        quant_plan = (self._quant_plan(model, options, block_size, progress)
                      if plan.bits == 4 and not model.spec.moe else None)

        builder = DecoderBuilder(model, precision, out_dir, progress, quant_plan)
        built = builder.build()
        self._save_checked(built, out_dir)
        (out_dir / GENAI_CONFIG).write_text(
            json.dumps(genai_config(model.spec, MODEL_FILE), indent=2) + "\n", encoding="utf-8"
        )
        copied = copy_support_files(model, out_dir)

        metadata: dict[str, Any] = {
            **self._graph_metadata(built),
            "io": {
                "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.%d.key",
                           "past_key_values.%d.value"],
                "outputs": ["logits", "present.%d.key", "present.%d.value"],
                "kv_layout": "[batch, kv_heads, seq, head_dim]",
            },
            "weight_dtype": self.precisions[precision].weights,
            "embedding_dtype": plan.embed_dtype.name,
            "compute_dtype": "float32",
            "kv_cache_dtype": "float32",
            "logits_dtype": "float32",
            "genai_model_type": genai_type,
            "notes": genai_notes(model.spec),
            "data_bytes": built.data_bytes,
            "largest_tensor_bytes": built.largest_tensor_bytes,
            "quantization": None,
        }
        tied = model.spec.tie_word_embeddings
        coverage = {
            "quantized": "every attention and MLP projection (q, k, v, o, gate, up, down)"
            + ("" if tied else "; the lm_head at 8 bits (round-to-nearest, blocks of 32)"),
            "not_quantized": f"embedding table{' (also the tied lm_head)' if tied else ''} "
            f"({plan.embed_dtype.name}), norms and biases (float32)",
        }
        if quant_plan is not None:
            metadata["quantization"] = {
                **self._planned_quantization(quant_plan, block_size, builder.fallback, quantizer_version),
                **coverage}
        elif plan.bits is not None:
            metadata["quantization"] = {**self._quantization(plan.bits, quantizer_version), **coverage}
        if builder.moe is not None:  # routed experts: com.microsoft.MoE / QMoE (moe.py)
            metadata["moe"] = builder.moe.describe(model.spec)
            if metadata["quantization"] is not None:
                metadata["quantization"]["experts"] = "com.microsoft.QMoE (see moe.quantization); routers float32"
        files = (MODEL_FILE, DATA_FILE, GENAI_CONFIG, *copied)
        # onnxruntime runs the graph as written: no tokenizer of its own, no limits looser than the defaults.
        return WrittenArtifact(files=files, format_metadata=metadata, traits=RunnerTraits())

    def _write_encoder(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress
                       ) -> WrittenArtifact:
        """An embedding encoder: the feature-extraction graph (encoder.py), tokenizer and pooling files."""
        builder = EncoderBuilder(model, precision, out_dir, progress)  # refuses int4 before writing
        encoder, plan = builder.encoder, builder.plan
        quantizer_version = require("onnxruntime").__version__ if plan.bits is not None else None
        built = builder.build()
        self._save_checked(built, out_dir)
        copied = copy_support_files(model, out_dir)
        copied += self._copy_sentence_transformers(model, out_dir)
        metadata: dict[str, Any] = {
            **self._graph_metadata(built),
            "model_kind": "encoder",
            "io": {
                "convention": "optimum feature-extraction",
                "inputs": list(encoder_inputs(encoder)),
                "outputs": list(ENCODER_OUTPUTS),
                "input_shape": "[batch_size, sequence_length] int64, right-padded, attention_mask 1 on real tokens",
                "output_shapes": {"last_hidden_state": "[batch_size, sequence_length, hidden]",
                                  "sentence_embedding": "[batch_size, hidden]"},
            },
            "embedding_dimension": model.spec.hidden_size,
            "pooling": encoder.pooling.to_dict(),
            "position_ids": "computed in the graph: " + (
                f"{encoder.position_offset} + rank among real tokens (attention_mask), padding at "
                f"{encoder.position_offset - 1}" if encoder.position_offset > 0 else "slot index"),
            "layer_norm": "ai.onnx LayerNormalization (opset 17)" + ("" if encoder.norm_bias else ", no bias input"),
            "precision": precision,
            "weight_dtype": self.precisions[precision].weights,
            "embedding_dtype": plan.embed_dtype.name,
            "compute_dtype": "float32",
            "data_bytes": built.data_bytes,
            "largest_tensor_bytes": built.largest_tensor_bytes,
            "quantization": None,
        }
        if encoder.position == "rope":  # ModernBERT: what the pre-LN graph computes beyond BERT's
            metadata["rope"] = (f"rotate-half over the whole head at slot indices 0..T-1, cos/sin computed in the "
                                f"graph; base {encoder.rope_theta:g} on global layers, {encoder.rope_local_theta:g} "
                                "on local layers")
            metadata["local_attention"] = {"layers": list(encoder.local_layers), "window": encoder.local_window,
                                           "rule": "a query sees real keys with |i - j| <= window"}
        if plan.bits is not None:
            geglu = encoder.mlp == "geglu"
            metadata["quantization"] = {
                **self._quantization(plan.bits, quantizer_version),
                "quantized": "every attention and MLP projection (q, k, v, o, up, " + ("gate, " if geglu else "")
                + "down)",
                "not_quantized": ("word embedding table" if encoder.position == "rope" else
                                  "word, position and token-type embedding tables") + f" ({plan.embed_dtype.name}), "
                "LayerNorms and biases (float32)",
            }
        files = (MODEL_FILE, DATA_FILE, *copied)
        return WrittenArtifact(files=files, format_metadata=metadata, traits=RunnerTraits())

    @staticmethod
    def _copy_sentence_transformers(model: SourceModel, out_dir: Path) -> list[str]:
        """modules.json, sentence_bert_config.json and each module's config file (1_Pooling/config.json), so a
        sentence-transformers user, and the artifact's reader, see the pooling the graph computes."""
        names = [n for n in SENTENCE_TRANSFORMERS_FILES if model.checkpoint.file(n) is not None]
        modules_path = model.checkpoint.file("modules.json")
        if modules_path is not None:
            # open_model already read and checked this file (paths relative, pipeline supported)
            modules = read_json_file(modules_path, MODULES_JSON_CAP)
            for module in modules[1:] if isinstance(modules, list) else []:
                path = module.get("path", "") if isinstance(module, dict) else ""
                config = f"{path}/config.json"
                if isinstance(path, str) and path not in ("", ".") and model.checkpoint.file(config) is not None:
                    (out_dir / path).mkdir(parents=True, exist_ok=True)
                    names.append(config)
        return copy_support_files(model, out_dir, names)

    @staticmethod
    def _save_checked(built: BuiltModel, out_dir: Path) -> None:
        """Write model.onnx (graph only; the weights are already in the data file) and run the ONNX checker."""
        onnx = require("onnx")
        model_path = out_dir / MODEL_FILE
        model_path.write_bytes(built.proto.SerializeToString())
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ConversionError(f"{model_path}: the ONNX checker rejects the generated model: {e}") from e

    @staticmethod
    def _graph_metadata(built: BuiltModel) -> dict[str, Any]:
        """What every onnx artifact's format metadata says about its graph file and the runtime it needs."""
        onnx = require("onnx")
        min_ort, reasons = min_onnxruntime(built.opset, built.ir_version, built.contrib_ops)
        return {
            "model_file": MODEL_FILE,
            "external_data_file": DATA_FILE,
            "opset": built.opset,
            "opset_imports": {(o.domain or "ai.onnx"): int(o.version) for o in built.proto.opset_import},
            "ir_version": built.ir_version,
            "min_onnxruntime": min_ort,
            "min_onnxruntime_reasons": reasons,
            "onnx_version": onnx.__version__,
        }

    @staticmethod
    def _quant_plan(model: SourceModel, options: QuantOptions, block_size: int, progress: Progress) -> QuantPlan:
        """The int4 recipe: float zero points (stored as uint8 ones plus a residual; quantize.py's NOTE) and
        scales rounded to float16 (stored as float32, MatMulNBits' T1 being the float32 activation type): the
        recipe of openvino:int4, so a build of both fits each tensor once (sovpack.quantize.cache)."""
        return plan_quantization(model, options, group_chooser(block_size), scale_dtype=np.float16,
                                 integer_zero=False, progress=progress, label="onnx:int4: quantization plan")

    @staticmethod
    def _planned_quantization(plan: QuantPlan, block_size: int, fallback: list[str], quantizer_version: str | None
                              ) -> dict[str, Any]:
        """int4's record: the plan (method, options, which tensors stay 8-bit, calibration) and the layout."""
        return {
            "op": "com.microsoft.MatMulNBits",
            "quantizer": "sovpack.quantize (codes) packed by sovpack.targets.onnx.quantize",
            "bits": 4,
            "block_size": block_size,
            "symmetric": plan.options.symmetric,
            "scale_dtype": "float32 (values rounded to float16)",
            "zero_points": "none (symmetric: the op's default 2^(bits-1))" if plan.options.symmetric else
            "float32 at 4 bits, uint8 at 8 bits",
            "algorithm": plan.method,
            "plan": plan.to_dict(),
            # Planned tensors no MatMulNBits block size fits: onnxruntime's quantizer (RTN, padded blocks of 32).
            "onnxruntime_quantizer": {"tensors": sorted(fallback), "onnxruntime_version": quantizer_version}
            if fallback else None,
        }

    @staticmethod
    def _quantization(bits: int, quantizer_version: str | None) -> dict[str, Any]:
        return {
            "op": "com.microsoft.MatMulNBits",
            "quantizer": "sovpack round-to-nearest, packed as onnxruntime's MatMulNBitsQuantizer packs it (that "
                         "quantizer itself for a width no block size divides)",
            "onnxruntime_version": quantizer_version,
            "bits": bits,
            "block_size": QUANT_BLOCK_SIZE,
            "symmetric": False,
            "algorithm": "RTN (round to nearest), per-block scale and uint8 zero point",
        }

    @staticmethod
    def _model_file(artifact_dir: Path, metadata: ArtifactMetadata) -> str:
        model_file = metadata.format_metadata.get("model_file", MODEL_FILE)
        if not isinstance(model_file, str) or model_file in ("", ".", "..") or "/" in model_file or (
            "\\" in model_file
        ):
            raise SourceError(f"{artifact_dir}: format_metadata.model_file {model_file!r} is not a file name")
        return model_file

    def open_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> OnnxRunner:
        model_file = self._model_file(artifact_dir, metadata)
        return OnnxRunner(Path(artifact_dir), model_file=model_file, traits=metadata.traits)

    def open_embedding_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> OnnxEmbeddingRunner:
        model_file = self._model_file(artifact_dir, metadata)
        return OnnxEmbeddingRunner(Path(artifact_dir), metadata.spec, model_file=model_file, traits=metadata.traits)
