"""The embedding runner of an onnx encoder artifact: onnxruntime (CPU) on the Optimum feature-extraction graph.

``embed_ids`` right-pads one batch of token-id lists (padding id from the spec, mask 0 on padding, token types
0) and returns the graph's own ``sentence_embedding`` and ``last_hidden_state``; ``tokenize`` / ``embed_texts``
are the artifact's text path: its tokenizer.json, truncated to the pooling's ``max_seq_length`` as
sentence-transformers truncates, then ``embed_ids``.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._protocols import Embeddings, RunnerTraits
from sovpack.errors import ParityError, UsageError
from sovpack.source.spec import EncoderSpec, ModelSpec
from sovpack.source.tokenizer import SourceTokenizer
from sovpack.targets.onnx.encoder import LAST_HIDDEN_STATE, SENTENCE_EMBEDDING
from sovpack.targets.onnx.graph import MODEL_FILE
from sovpack.targets.onnx.runner import RUNNER_THREADS, open_session

TOKENIZER_FILE = "tokenizer.json"


class OnnxEmbeddingRunner:
    """An encoder artifact in an onnxruntime InferenceSession (CPU): token ids or texts -> embeddings."""

    name = "onnxruntime"
    traits: RunnerTraits

    def __init__(self, artifact_dir: Path, spec: ModelSpec, *, model_file: str = MODEL_FILE,
                 threads: int = RUNNER_THREADS, traits: RunnerTraits | None = None) -> None:
        if spec.encoder is None:
            raise UsageError(f"{artifact_dir}: {spec.family} is not an embedding encoder")
        self.dir = Path(artifact_dir)
        self.spec = spec
        self.encoder: EncoderSpec = spec.encoder
        self.traits = traits if traits is not None else RunnerTraits()
        self.threads = threads
        self.path = self.dir / model_file
        session, self.ort_version = open_session(self.path, threads)
        self._session: Any | None = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        missing |= {LAST_HIDDEN_STATE, SENTENCE_EMBEDDING} - set(self.output_names)
        if missing:
            raise ParityError(f"{self.path}: not an encoder graph with feature-extraction I/O (missing "
                              f"{', '.join(sorted(missing))})")

    @property
    def session(self) -> Any:
        """The InferenceSession; a ParityError once the runner is closed."""
        if self._session is None:
            raise ParityError(f"{self.path}: the onnxruntime embedding runner is closed")
        return self._session

    def close(self) -> None:
        """Release the session; closing twice is a no-op."""
        self._session = None

    @cached_property
    def tokenizer(self) -> SourceTokenizer:
        return SourceTokenizer(self.dir / TOKENIZER_FILE, max_length=self.encoder.pooling.max_seq_length)

    def tokenize(self, text: str) -> list[int] | None:
        """The artifact's tokenizer.json on ``text``: special tokens added, truncated to max_seq_length."""
        return self.tokenizer.encode(text)

    def feeds(self, batch: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """One right-padded batch as the graph's inputs; UsageError for what the model cannot take."""
        if not batch or any(len(ids) == 0 for ids in batch):
            raise UsageError("embed_ids takes one or more non-empty sequences of token ids")
        width = max(len(ids) for ids in batch)
        positions = self.spec.max_position_embeddings - self.encoder.position_offset
        if width > positions:
            raise UsageError(f"a sequence of {width} tokens exceeds the model's {positions} positions")
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        ids = np.full((len(batch), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for b, seq in enumerate(batch):
            ids[b, : len(seq)] = np.asarray(seq, dtype=np.int64)
            mask[b, : len(seq)] = 1
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.spec.vocab_size}), got {ids.min()}..{ids.max()}")
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        return feeds

    def embed_ids(self, batch: Sequence[Sequence[int]]) -> Embeddings:
        """Pooled embeddings [B, H] and token states [B, T, H] (right-padded) of one batch."""
        feeds = self.feeds(batch)
        session = self.session
        # NOTE: broad catch: onnxruntime's run-time errors share no base narrower than Exception (runner.py).
        try:
            hidden, pooled = session.run([LAST_HIDDEN_STATE, SENTENCE_EMBEDDING], feeds)
        except Exception as e:
            raise ParityError(f"{self.path}: onnxruntime {self.ort_version} failed running the model: {e}") from e
        return Embeddings(embeddings=np.asarray(pooled, dtype=np.float32),
                          hidden=np.asarray(hidden, dtype=np.float32))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray | None:
        """Sentence embeddings [len(texts), H] through the artifact's own tokenizer, one batch."""
        return self.embed_ids([self.tokenizer.encode(t) for t in texts]).embeddings

    def runtime_info(self) -> dict[str, str]:
        return {
            "runtime": self.name,
            "onnxruntime": self.ort_version,
            "providers": "CPUExecutionProvider",
            "intra_op_num_threads": str(self.threads),
            "model": self.path.name,
            "python": platform.python_version(),
        }
