"""The ``onnx`` target: a decoder graph for ONNX Runtime and onnxruntime-genai, an embedding-encoder graph for
ONNX Runtime, and their runners.

An artifact directory holds ``model.onnx`` (graph only), ``model.onnx.data`` (every weight, external data),
``genai_config.json`` (so ``onnxruntime_genai.Model(dir)`` loads it) and the source tokenizer files. Its I/O is
the Optimum / onnxruntime-genai decoder convention: ``input_ids``, ``attention_mask`` (past + new),
``position_ids`` and ``past_key_values.{i}.key/value`` in; ``logits`` and ``present.{i}.key/value`` out, KV
tensors [batch, kv_heads, seq, head_dim].

An embedding encoder (BERT, XLM-RoBERTa: ``spec.encoder`` set) is written instead as Optimum's
feature-extraction graph: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT) in;
``last_hidden_state`` and the pooled, maybe normalised ``sentence_embedding`` out. Beside it: the tokenizer,
config.json and the sentence-transformers files (modules.json, 1_Pooling/config.json, sentence_bert_config.json)
saying how it pools; no genai_config.json (onnxruntime-genai runs decoders only).

Modules: ``target`` (the registered target: precision table, writer, ``open_runner``), ``precisions``
(storage plans, minimum-onnxruntime rule), ``graph`` (the decoder graph), ``positions`` (attention
biases per window and rotary tables, longrope's per-pass switch), ``external_data`` (the weight file),
``quantize`` (MatMulNBits int8/int4), ``moe`` (mixture-of-experts layers as MoE/QMoE), ``genai``
(genai_config.json), ``runner`` (onnxruntime and genai runners), ``encoder`` (the embedding-encoder graph),
``encoder_runner`` (its onnxruntime embedding runner).

Heavy packages (onnx, onnxruntime, onnxruntime_genai) are imported inside functions, so importing this package
costs nothing and a missing runtime becomes a MissingDependencyError naming the ``onnx`` extra.

Errors: writer problems are ConversionError, a runtime failing on an artifact is ParityError, a missing
runtime package is MissingDependencyError, unreadable or invalid input files are SourceError.
"""

from __future__ import annotations

from sovpack.targets.onnx.encoder_runner import OnnxEmbeddingRunner
from sovpack.targets.onnx.external_data import DATA_FILE
from sovpack.targets.onnx.genai import GENAI_CONFIG, GENAI_MODEL_TYPES, genai_config
from sovpack.targets.onnx.graph import MODEL_FILE
from sovpack.targets.onnx.runner import GenaiRunner, OnnxRunner
from sovpack.targets.onnx.target import OnnxTarget

__all__ = [
    "DATA_FILE",
    "GENAI_CONFIG",
    "GENAI_MODEL_TYPES",
    "MODEL_FILE",
    "GenaiRunner",
    "OnnxEmbeddingRunner",
    "OnnxRunner",
    "OnnxTarget",
    "genai_config",
]
