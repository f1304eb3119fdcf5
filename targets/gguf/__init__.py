"""GGUF for llama.cpp: a streaming gguf-py writer, llama.cpp's own K-quants, and a llama-cpp-python runner.

The writer streams one tensor at a time from the checkpoint's memory map (``writer``, ``tensors``) onto the
llama.cpp architecture of the model's family (``arch``; mixture-of-experts layers as stacked ``ffn_*_exps``
tensors written one expert at a time, ``experts``), with the tokenizer translated into llama.cpp's own
pipelines (``tokenizer``, ``pretokenizer``, ``special``, ``sentencepiece``, ``vocab``); q4_k_m / q5_k_m / q6_k
come from llama.cpp's quantizer (``quantize``); ``runner`` runs the file in llama.cpp; ``target`` ties them into
the registered ``gguf`` target. Embedding encoders (BERT, XLM-RoBERTa) become llama.cpp's ``bert``
architecture (``encoder``, ``encoder_tokenizer``: WordPiece / Unigram) and run as an EmbeddingRunner
(``encoder_runner``). Limits llama.cpp's kernels cannot meet (its float16 GELU table, for Gemma at
f32) and corpus texts its tokenizer encodes differently are published as the artifact's runner traits.

Errors: a file the writer cannot produce is a ConversionError; llama.cpp failing to load or run an artifact is
a ParityError; a missing gguf / llama-cpp-python is a MissingDependencyError naming its extra; an unreadable or
malformed input file (tokenizer.json, tokenizer.model, artifact directory) is a SourceError.
"""

from __future__ import annotations

from sovpack.targets.gguf.arch import ARCHES, FAMILIES, ArchPlan, arch_plan
from sovpack.targets.gguf.encoder import ENCODER_FAMILIES, ENCODER_PRECISIONS
from sovpack.targets.gguf.encoder_runner import LlamaCppEmbeddingRunner
from sovpack.targets.gguf.runner import LlamaCppRunner, kv_cache_type
from sovpack.targets.gguf.runtime import import_gguf, import_llama_cpp
from sovpack.targets.gguf.target import PRECISIONS, GgufTarget, parity_limits
from sovpack.targets.gguf.tensors import permute_rope_rows

__all__ = [
    "ARCHES",
    "ENCODER_FAMILIES",
    "ENCODER_PRECISIONS",
    "FAMILIES",
    "PRECISIONS",
    "ArchPlan",
    "GgufTarget",
    "LlamaCppEmbeddingRunner",
    "LlamaCppRunner",
    "arch_plan",
    "import_gguf",
    "import_llama_cpp",
    "kv_cache_type",
    "parity_limits",
    "permute_rope_rows",
]
