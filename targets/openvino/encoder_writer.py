"""The writer of an OpenVINO embedding-encoder artifact: the pooled IR (``encoder``), its tokenizer IR, config.json.

The directory is what ``openvino_genai.TextEmbeddingPipeline(dir, "CPU")`` loads: ``openvino_model.xml``/``.bin``,
``openvino_tokenizer.xml``/``.bin`` (truncating at the sentence-transformers max_seq_length) and ``config.json``
(genai reads ``max_position_embeddings`` from it to warn about a too-large ``max_length``), plus the checkpoint's
tokenizer files for provenance. The sentence-transformers module files are not copied: the pooling they describe
is already inside the graph, and a reader applying it again would pool twice; the artifact metadata records it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress
from sovpack._protocols import RunnerTraits, WrittenArtifact
from sovpack.errors import ConversionError
from sovpack.source.model import SourceModel
from sovpack.source.spec import ModelSpec
from sovpack.targets.base import copy_support_files
from sovpack.targets.openvino.runtime import MODEL_BIN, MODEL_XML, TOKENIZER_XML, require_openvino, require_tokenizers

__all__ = ["PRECISE_PRECISIONS", "input_length_limit", "write_encoder"]

_SUPPORT = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Precisions whose IR marks every compute node ``precise`` (f32 even where the device would lower it; encoder.py).
PRECISE_PRECISIONS = frozenset({"fp32"})


def input_length_limit(spec: ModelSpec, tokenizer_config: dict[str, Any] | None) -> int:
    """Tokens per text, special tokens included: sentence_bert_config.json's max_seq_length, else what fits the
    position table and the tokenizer's model_max_length (sentence-transformers' own fallback)."""
    encoder = spec.encoder
    if encoder is None:
        raise ConversionError(f"{spec.family} is not an embedding encoder")
    positions = spec.max_position_embeddings - encoder.position_offset
    limit = encoder.pooling.max_seq_length or positions
    declared = (tokenizer_config or {}).get("model_max_length")
    if encoder.pooling.max_seq_length is None and isinstance(declared, int) and 0 < declared < limit:
        limit = declared
    if limit > positions:
        raise ConversionError(f"max_seq_length {limit} exceeds the model's {positions} positions")
    return int(limit)


def write_encoder(model: SourceModel, precision: str, out: Path, progress: Progress,
                  save: Callable[[Any, Any, Path], None]) -> WrittenArtifact:
    """Write the encoder IR, tokenizer IR and support files of ``model`` at ``precision`` into ``out``.

    ``save(ov, model, path)`` writes one IR (the target's ``_save_model``: no fp16 compression, failures as
    ConversionError); passed in so this module does not import the target module that imports it.
    """
    ov = require_openvino()
    openvino_tokenizers = require_tokenizers()
    from sovpack import __version__
    from sovpack.targets.openvino.encoder import (
        EMBEDDING_NAMES,
        ENCODER_RUNTIME_OPTIONS,
        HIDDEN_NODE,
        build_encoder,
        input_names,
    )
    from sovpack.targets.openvino.encoder_rope import ROTARY_BLOCKS
    from sovpack.targets.openvino.encoder_tokenizer import convert_encoder_tokenizer
    from sovpack.targets.openvino.precise import mark_fp16_decompression, mark_precise
    from sovpack.targets.openvino.weights import SCHEMES, counted_weights

    spec = model.spec
    encoder = spec.encoder
    if encoder is None:
        raise ConversionError(f"{model.path}: {spec.family} is not an embedding encoder")
    scheme = SCHEMES[precision]
    weights, weights_written = counted_weights(model, precision, progress)
    graph = build_encoder(spec, weights)
    limit = input_length_limit(spec, model.checkpoint.tokenizer_config)
    pooling = encoder.pooling
    for key, value in (("sovpack_version", __version__), ("precision", precision), ("family", spec.family),
                       ("architecture", spec.architecture), ("model_kind", "encoder"),
                       ("pooling_mode", pooling.mode), ("normalize", str(pooling.normalize)),
                       ("max_seq_length", str(limit)), ("output", "pooled sentence embedding [batch, 1, hidden]"),
                       ("genai_pooling", "keep TextEmbeddingPipeline's default pooling_type (CLS)")):
        graph.set_rt_info(str(value), ["sovpack", key])
    for key, value in ENCODER_RUNTIME_OPTIONS.items():
        graph.set_rt_info(value, ["runtime_options", key])
    save(ov, graph, out / MODEL_XML)
    del graph
    fp16 = scheme.kind == "float" and scheme.float_dtype == np.float16
    marked = mark_fp16_decompression(out / MODEL_XML) if fp16 else 0
    if precision in PRECISE_PRECISIONS:
        precise = mark_precise(out / MODEL_XML)
    elif encoder.position == "rope":
        precise = mark_precise(out / MODEL_XML, ROTARY_BLOCKS)
    else:
        precise = 0
    weights_written()

    files = [MODEL_XML, MODEL_BIN]
    tokenizer_info: dict[str, Any]
    tokenizer_json = model.checkpoint.tokenizer_json
    if tokenizer_json is None:
        tokenizer_info = {"converted": False, "reason": "the checkpoint has no tokenizer.json"}
    else:
        tokenizer = convert_encoder_tokenizer(tokenizer_json, model.checkpoint.tokenizer_config, max_length=limit,
                                              pad_token_id=spec.pad_token_id)
        save(ov, tokenizer, out / TOKENIZER_XML)
        files.append(TOKENIZER_XML)
        if (out / TOKENIZER_XML).with_suffix(".bin").is_file():
            files.append(str(Path(TOKENIZER_XML).with_suffix(".bin")))
        tokenizer_info = {
            "converted": True,
            "route": "tokenizer.json -> openvino_tokenizers pipeline steps (no transformers)",
            "truncation": f"on by default, at {limit} tokens (special tokens included)",
            "padding_side": "right",
            "detokenizer": False,
        }
    files.extend(copy_support_files(model, out, _SUPPORT))

    stats = weights.stats
    rope = encoder.position == "rope"
    projections = "q, k, v, o, up, gate, down" if encoder.mlp == "geglu" else "q, k, v, o, up, down"
    format_metadata: dict[str, Any] = {
        "model_kind": "encoder",
        "openvino_version": ov.get_version(),
        "openvino_tokenizers_version": openvino_tokenizers.__version__,
        "precision": precision,
        "weights": {
            "scheme": precision,
            "tensors": stats.tensors,
            "float_tensors": stats.float_tensors,
            "float_dtype": "f16" if fp16 else "f32",
            "int8_tensors": stats.int8_layers,
            "symmetric": scheme.symmetric if scheme.kind == "int" else None,
            "quantized": f"word embeddings and every projection ({projections}), per output channel"
            if scheme.kind == "int" else None,
            "fp16_decompression_marked": marked,
        },
        "inputs": list(input_names(encoder)),
        "outputs": sorted(EMBEDDING_NAMES),
        "output_shape": "[batch, 1, hidden]: the pooled sentence embedding",
        "token_states_node": HIDDEN_NODE,
        "embedding_dimension": spec.hidden_size,
        "pooling": pooling.to_dict(),
        "max_seq_length": limit,
        "position_ids": f"computed in the graph: {encoder.position_offset} + rank among real tokens "
                        "(attention_mask), so either padding side gives the same embedding"
        + ("; rotary (q and k) and the local window use them" if rope else ""),
        "runtime_options": dict(ENCODER_RUNTIME_OPTIONS),
        "precise_nodes": precise,
        "compute_precision": "f32 at the device's defaults (every compute node marked precise)"
        if precision in PRECISE_PRECISIONS
        else "the device's default inference precision (bf16 on AMX/AVX512-BF16 CPUs)"
        + (", except the rotary angles (marked precise)" if rope else "")
        + "; parity compiles with INFERENCE_PRECISION_HINT=f32",
        "tokenizer": tokenizer_info,
        "genai": {
            "pipeline": "openvino_genai.TextEmbeddingPipeline(dir, 'CPU').embed_documents(texts)",
            "config": "defaults: pooling is in the graph; keep pooling_type CLS (the default)"
            + ("" if pooling.normalize else "; pass normalize=False for the unnormalised vectors (the defaults "
               "L2-normalise: same direction, unit length)"),
            "max_pooling": "computed in the graph" if pooling.mode == "max" else None,
        },
    }
    return WrittenArtifact(files=tuple(files), format_metadata=format_metadata, traits=RunnerTraits())
