"""The ``openvino`` target: a stateful OpenVINO IR directory that openvino-genai's ``LLMPipeline`` loads.

An artifact directory holds ``openvino_model.xml``/``.bin`` (the decoder, KV cache as internal state),
``openvino_tokenizer.xml``/``openvino_detokenizer.xml`` (+ ``.bin``), the checkpoint's tokenizer and config
files and a ``generation_config.json`` with the stop ids, which is what ``openvino_genai.LLMPipeline(dir,
"CPU")`` needs to tokenize, generate and detokenize. The graph's interface — inputs ``input_ids``,
``attention_mask``, ``position_ids``, ``beam_idx``, output ``logits``, cache variables named
``past_key_values.{i}.keypresent.{i}.key`` / ``...valuepresent.{i}.value`` — is the one optimum-intel exports
(see ``graph``).

NOTE: the graph is built directly with OpenVINO's Python graph API (``openvino.opset13``) from the canonical
spec and weights, not converted from the ONNX target's graph. That keeps this target independent of the ONNX
builder (written concurrently), lets the KV cache be ReadValue/Assign state from the start (an ONNX graph has
explicit past/present tensors, which would then need OpenVINO's MakeStateful rewrite plus beam_idx surgery),
and lets weights enter as postponed constants that ``ov.save_model`` materializes one at a time, so the
writer never holds the model in memory (``weights``). The tokenizer is converted from tokenizer.json
without transformers (``tokenizer``).

Every node of the three IRs has a deterministic name (block and role, or a counter local to the graph):
OpenVINO's default names number nodes from a process-wide counter, which made a second conversion in the same
process write different XML. The same checkpoint therefore gives byte-identical files in any process.

Parity runs on the CPU plugin with ``INFERENCE_PRECISION_HINT=f32``, ``KV_CACHE_PRECISION=f32`` and
``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` for every precision. On CPUs with AMX or AVX512-BF16 the plugin otherwise
computes in bf16, stores the KV cache as u8 and quantizes activations for int8/int4 weights, all silently;
with these hints the check measures what the artifact's weights do (f16 rounding, int8/int4 quantization)
and nothing else. Both the requested and the effective values are recorded in ``runtime_info``. The decoder IR
carries the KV-cache and dynamic-quantization settings in its rt_info ``runtime_options`` (``RUNTIME_OPTIONS``),
which OpenVINO applies when a caller passes none, so ``LLMPipeline(dir, "CPU")`` at its defaults uses them too;
the inference precision cannot be carried that way (bf16 compute on AMX CPUs at the defaults).

Embedding encoders (BERT, XLM-R; issue 15) get a directory ``openvino_genai.TextEmbeddingPipeline(dir, "CPU")``
loads at its defaults and answers with the sentence-transformers embeddings: the pooling (and normalisation) is
inside the graph, whose one output is the pooled [batch, 1, hidden] embedding the pipeline's default CLS pooling
passes through unchanged, and the tokenizer IR truncates at max_seq_length (``encoder``, ``encoder_writer``).

Modules: ``target`` (precision table, writer), ``runner`` (the artifact on OpenVINO), ``graph`` (the decoder
graph), ``moe`` (the mixture-of-experts block and its stacked expert constants), ``weights`` (postponed,
quantized constants), ``tokenizer`` (tokenizer.json -> OpenVINO tokenizer),
``runtime`` (file names, parity config, lazy imports), ``names`` (deterministic node names); for encoders
``encoder`` (the pooled IR), ``encoder_writer``, ``encoder_tokenizer`` (WordPiece / Unigram tokenizer IRs) and
``encoder_runner`` (the IR, its tokenizer and TextEmbeddingPipeline).

Errors: writer problems raise ConversionError, a runtime failing on an artifact ParityError, unreadable or
invalid input files SourceError, a missing ``openvino``/``openvino_tokenizers`` MissingDependencyError.
"""

from __future__ import annotations

from sovpack.targets.openvino.encoder_runner import OpenvinoEmbeddingRunner
from sovpack.targets.openvino.runner import OpenvinoRunner
from sovpack.targets.openvino.runtime import (
    DETOKENIZER_XML,
    GENERATION_CONFIG,
    MODEL_BIN,
    MODEL_XML,
    PARITY_CONFIG,
    RUNTIME_OPTIONS,
    TOKENIZER_XML,
)
from sovpack.targets.openvino.target import FAMILIES, PRECISION_TABLE, PRECISIONS, OpenvinoTarget

__all__ = [
    "DETOKENIZER_XML",
    "FAMILIES",
    "GENERATION_CONFIG",
    "MODEL_BIN",
    "MODEL_XML",
    "PARITY_CONFIG",
    "PRECISIONS",
    "PRECISION_TABLE",
    "RUNTIME_OPTIONS",
    "TOKENIZER_XML",
    "OpenvinoEmbeddingRunner",
    "OpenvinoRunner",
    "OpenvinoTarget",
]
