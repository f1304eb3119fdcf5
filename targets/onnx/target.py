"""The ``onnx`` target: its precision table, the artifact writer, and the runner it opens."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovpack._io import Progress
from sovpack._protocols import Precision, RunnerTraits, WrittenArtifact
from sovpack.errors import ConversionError, SourceError
from sovpack.source.model import SourceModel
from sovpack.targets.base import copy_support_files, register_target
from sovpack.targets.onnx.deps import require
from sovpack.targets.onnx.external_data import DATA_FILE
from sovpack.targets.onnx.genai import (
    GENAI_CONFIG,
    GENAI_MODEL_TYPES,
    genai_config,
    genai_model_type,
    genai_notes,
)
from sovpack.targets.onnx.graph import MODEL_FILE, DecoderBuilder
from sovpack.targets.onnx.precisions import PRECISIONS, min_onnxruntime, plan_for
from sovpack.targets.onnx.quantize import QUANT_BLOCK_SIZE
from sovpack.targets.onnx.runner import OnnxRunner

if TYPE_CHECKING:
    from sovpack.artifact import ArtifactMetadata


@register_target
class OnnxTarget:
    """ONNX Runtime / onnxruntime-genai artifacts at fp32, fp16 (fp16 weights, fp32 compute), int8, int4."""

    name = "onnx"
    precisions: Mapping[str, Precision] = PRECISIONS
    default_precision = "fp32"
    runtime_packages: tuple[str, ...] = ("onnx", "onnxruntime", "onnxruntime-genai")
    # Every family onnxruntime-genai has a decoder type for; the graph itself covers all of them.
    families: frozenset[str] = frozenset(GENAI_MODEL_TYPES)

    def write(self, model: SourceModel, precision: str, out_dir: Path, progress: Progress) -> WrittenArtifact:
        onnx = require("onnx")
        plan = plan_for(precision)
        genai_type = genai_model_type(model.spec)
        quantizer_version = require("onnxruntime").__version__ if plan.bits is not None else None

        built = DecoderBuilder(model, precision, out_dir, progress).build()
        model_path = out_dir / MODEL_FILE
        model_path.write_bytes(built.proto.SerializeToString())
        try:
            onnx.checker.check_model(str(model_path), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ConversionError(f"{model_path}: the ONNX checker rejects the generated model: {e}") from e
        (out_dir / GENAI_CONFIG).write_text(
            json.dumps(genai_config(model.spec, MODEL_FILE), indent=2) + "\n", encoding="utf-8"
        )
        copied = copy_support_files(model, out_dir)

        min_ort, reasons = min_onnxruntime(built.opset, built.ir_version, built.contrib_ops)
        opsets = {(o.domain or "ai.onnx"): int(o.version) for o in built.proto.opset_import}
        metadata: dict[str, Any] = {
            "model_file": MODEL_FILE,
            "external_data_file": DATA_FILE,
            "opset": built.opset,
            "opset_imports": opsets,
            "ir_version": built.ir_version,
            "min_onnxruntime": min_ort,
            "min_onnxruntime_reasons": reasons,
            "onnx_version": onnx.__version__,
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
        if plan.bits is not None:
            metadata["quantization"] = {
                "op": "com.microsoft.MatMulNBits",
                "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
                "onnxruntime_version": quantizer_version,
                "bits": plan.bits,
                "block_size": QUANT_BLOCK_SIZE,
                "symmetric": False,
                "algorithm": "RTN (round to nearest), per-block scale and uint8 zero point",
                "quantized": "every attention and MLP projection (q, k, v, o, gate, up, down)",
                "not_quantized": f"embedding table and lm_head ({plan.embed_dtype.name}), norms and biases "
                "(float32)",
            }
        files = (MODEL_FILE, DATA_FILE, GENAI_CONFIG, *copied)
        # onnxruntime runs the graph as written: no tokenizer of its own, no limits looser than the defaults.
        return WrittenArtifact(files=files, format_metadata=metadata, traits=RunnerTraits())

    def open_runner(self, artifact_dir: Path, metadata: ArtifactMetadata) -> OnnxRunner:
        model_file = metadata.format_metadata.get("model_file", MODEL_FILE)
        if not isinstance(model_file, str) or model_file in ("", ".", "..") or "/" in model_file or (
            "\\" in model_file
        ):
            raise SourceError(f"{artifact_dir}: format_metadata.model_file {model_file!r} is not a file name")
        return OnnxRunner(Path(artifact_dir), model_file=model_file, traits=metadata.traits)
