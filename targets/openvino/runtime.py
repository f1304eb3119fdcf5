"""What the writer and the runner share: the artifact's file names, the parity compile config, lazy imports.

The OpenVINO packages are imported only when a conversion or a runner needs them, so importing the target
(which every ``sovpack`` command does through ``load_targets``) stays light.
"""

from __future__ import annotations

from typing import Any

from sovpack.errors import MissingDependencyError

MODEL_XML = "openvino_model.xml"
MODEL_BIN = "openvino_model.bin"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
GENERATION_CONFIG = "generation_config.json"

# Compile properties for parity (see the package docstring). Values are strings so they read the same in the
# report as on a command line (benchmark_app -hint ..., LLMPipeline(..., **PARITY_CONFIG)).
PARITY_CONFIG: dict[str, str] = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}


def require_openvino() -> Any:
    """The ``openvino`` module, or MissingDependencyError naming the ``openvino`` extra."""
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino") from e
    return openvino


def require_tokenizers() -> Any:
    """The ``openvino_tokenizers`` module (importing it registers the tokenizer ops with every later ov.Core)."""
    try:
        import openvino_tokenizers
    except ImportError as e:
        raise MissingDependencyError("openvino_tokenizers", "openvino") from e
    return openvino_tokenizers
