"""An OpenVINO embedding-encoder artifact on its runtime: the IR through ``openvino.Core`` (parity), its tokenizer IR,
and openvino-genai's ``TextEmbeddingPipeline`` (the text path a user calls).

``embed_ids`` right-pads one batch (the spec's padding id, mask 0 on padding, token types 0), compiles with
:data:`ENCODER_PARITY_CONFIG` (f32 compute, no activation quantization: what the artifact's weights do and
nothing else) and returns the graph's pooled embeddings plus the token states, exposed by adding the graph's
``encoder/token_states`` node as a second output at load time.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sovpack._protocols import Embeddings, RunnerTraits
from sovpack.errors import MissingDependencyError, ParityError, SourceError, UsageError
from sovpack.source.spec import EncoderSpec, ModelSpec
from sovpack.targets.openvino.encoder import EMBEDDING_NAMES, HIDDEN_NODE
from sovpack.targets.openvino.runner import _compile, _type_name
from sovpack.targets.openvino.runtime import MODEL_XML, TOKENIZER_XML, require_openvino, require_tokenizers

if TYPE_CHECKING:
    from sovpack.artifact import ArtifactMetadata

__all__ = ["ENCODER_PARITY_CONFIG", "OpenvinoEmbeddingRunner"]

ENCODER_PARITY_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
_TOKEN_STATES = "token_states"
_REPORTED = ("INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "EXECUTION_MODE_HINT",
             "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


class OpenvinoEmbeddingRunner:
    """An encoder artifact on OpenVINO (CPU by default): token ids or texts -> sentence embeddings.

    ``config`` replaces :data:`ENCODER_PARITY_CONFIG` for ``embed_ids`` (``{}``: the device's defaults).
    ``embed_texts`` always runs TextEmbeddingPipeline as a user would: at its defaults, plus ``normalize=False``
    for a model without a Normalize module (the defaults L2-normalise every embedding).
    """

    name = "openvino"

    def __init__(self, artifact_dir: Path, metadata: ArtifactMetadata | None = None, *, spec: ModelSpec | None = None,
                 device: str = "CPU", config: Mapping[str, str] | None = None) -> None:
        ov = require_openvino()
        self.dir = Path(artifact_dir)
        self.metadata = metadata
        resolved = spec if spec is not None else metadata.spec if metadata is not None else None
        if resolved is None or resolved.encoder is None:
            raise UsageError(f"{self.dir}: the OpenVINO embedding runner needs an encoder spec")
        self.spec: ModelSpec = resolved
        self.encoder: EncoderSpec = resolved.encoder
        self.traits: RunnerTraits = metadata.traits if metadata is not None else RunnerTraits()
        self.device = device
        self.config = dict(ENCODER_PARITY_CONFIG if config is None else config)
        xml = self.dir / MODEL_XML
        if not xml.is_file():
            raise SourceError(f"{xml}: missing (not an OpenVINO artifact directory?)")
        tokenizer_xml = self.dir / TOKENIZER_XML
        if tokenizer_xml.is_file():
            require_tokenizers()  # NOTE: before the Core exists, or it never learns the tokenizer IR's ops
        self._core: Any | None = ov.Core()
        try:
            model = self._core.read_model(str(xml))
        except RuntimeError as e:
            raise SourceError(f"{xml}: OpenVINO could not read it: {e}") from e
        anchors = [op for op in model.get_ordered_ops() if op.get_friendly_name() == HIDDEN_NODE]
        if len(anchors) != 1 or not any(EMBEDDING_NAMES & set(out.get_names()) for out in model.outputs):
            raise SourceError(f"{xml}: not a sovpack encoder IR (no {HIDDEN_NODE!r} node or pooled output)")
        anchors[0].output(0).get_tensor().set_names({_TOKEN_STATES})
        model.add_outputs([anchors[0].output(0)])
        self.input_names = {name for port in model.inputs for name in port.names}
        try:
            self._compiled: Any | None = self._core.compile_model(model, device, self.config)
        except RuntimeError as e:
            raise ParityError(f"{xml}: OpenVINO could not compile it on {device}: {e}") from e
        self._tokenizer: Any | None = None
        if tokenizer_xml.is_file():
            self._tokenizer = _compile(self._core, tokenizer_xml, "CPU")
        self._pipeline: Any | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def compiled(self) -> Any:
        if self._compiled is None:
            raise UsageError(f"the OpenVINO embedding runner on {self.dir} is closed")
        return self._compiled

    def close(self) -> None:
        """Release the compiled models, the genai pipeline and the core; later calls do nothing."""
        self._compiled = self._tokenizer = self._pipeline = self._core = None

    # -- the graph -------------------------------------------------------------------------------------
    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings:
        rows = [[int(t) for t in seq] for seq in batch]
        if not rows or any(not seq for seq in rows):
            raise UsageError("embed_ids takes one or more non-empty sequences of token ids")
        width = max(len(seq) for seq in rows)
        positions = self.spec.max_position_embeddings - self.encoder.position_offset
        if width > positions:
            raise UsageError(f"a sequence of {width} tokens exceeds the model's {positions} positions")
        bad = [t for seq in rows for t in seq if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise UsageError(f"token ids must be in [0, {self.spec.vocab_size}), got {bad[:5]}")
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        ids = np.full((len(rows), width), pad, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, seq in enumerate(rows):
            ids[b, : len(seq)] = seq
            mask[b, : len(seq)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        try:
            result = self.compiled.create_infer_request().infer(feeds)
        except RuntimeError as e:
            raise ParityError(f"{self.dir / MODEL_XML}: OpenVINO inference failed: {e}") from e
        pooled = hidden = None
        for port, value in result.items():
            names = set(port.get_names())
            if _TOKEN_STATES in names:
                hidden = np.array(value, dtype=np.float32, copy=True)
            elif names & EMBEDDING_NAMES:
                pooled = np.array(value, dtype=np.float32, copy=True)
        if pooled is None or hidden is None:
            raise ParityError(f"{self.dir / MODEL_XML}: inference returned no embeddings / token states")
        return Embeddings(embeddings=pooled[:, 0, :], hidden=hidden)

    # -- the text path ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int] | None:
        if self._tokenizer is None:
            return None
        try:
            result = self._tokenizer([text])
        except RuntimeError as e:
            raise ParityError(f"{self.dir / TOKENIZER_XML}: the OpenVINO tokenizer failed: {e}") from e
        return [int(t) for t in result["input_ids"][0]]

    @property
    def genai_config(self) -> dict[str, Any]:
        """What ``embed_texts`` passes to TextEmbeddingPipeline beyond (dir, device): nothing, unless the model
        has no Normalize module."""
        return {} if self.encoder.pooling.normalize else {"normalize": False}

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        if self._tokenizer is None:
            return None
        if self._pipeline is None:
            try:
                import openvino_genai
            except ImportError as e:
                raise MissingDependencyError("openvino_genai", "openvino") from e
            try:
                self._pipeline = openvino_genai.TextEmbeddingPipeline(str(self.dir), self.device,
                                                                      **self.genai_config)
            except RuntimeError as e:
                raise ParityError(f"{self.dir}: openvino_genai.TextEmbeddingPipeline refused it: {e}") from e
        try:
            vectors = self._pipeline.embed_documents(list(texts))
        except RuntimeError as e:
            raise ParityError(f"{self.dir}: TextEmbeddingPipeline.embed_documents failed: {e}") from e
        return np.asarray(vectors, dtype=np.float32)

    def runtime_info(self) -> dict[str, str]:
        ov = require_openvino()
        info = {
            "runtime": "openvino",
            "openvino": ov.get_version(),
            "device": self.device,
            "python": platform.python_version(),
            "requested_config": json.dumps(self.config, sort_keys=True),
            "genai_config": json.dumps(self.genai_config, sort_keys=True),
            "artifact_precision": self.metadata.precision if self.metadata is not None else "",
        }
        compiled = self.compiled
        if self._core is not None:  # provenance only: a device that does not report a property leaves it out
            with contextlib.suppress(RuntimeError):
                info["device_name"] = str(self._core.get_property(self.device, "FULL_DEVICE_NAME"))
        for key in _REPORTED:
            try:
                info[key.lower()] = _type_name(compiled.get_property(key))
            except RuntimeError:
                continue
        with contextlib.suppress(ImportError):
            import openvino_genai
            import openvino_tokenizers

            info["openvino_tokenizers"] = openvino_tokenizers.__version__
            info["openvino_genai"] = openvino_genai.__version__
        return info
