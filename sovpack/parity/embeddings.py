"""Parity for embedding encoders: each text's embedding on the artifact's runtime against the numpy reference's.

Three things are compared, all on one batch of texts of mixed lengths (right-padded, so padding must not leak):

- the graph: the runtime's pooled embedding for the reference's token ids, by cosine similarity per text
  (``min_cosine``), and its token states before pooling where it exposes them (``max_hidden_abs``);
- the runtime's own text pipeline (its tokenizer, truncation and pooling, as a user calls it), by the same
  cosine, on the texts short enough that no truncation applies (how a runtime truncates is the tokenizer
  check's business);
- the tokenizer: the artifact's token ids against the source tokenizer's on the tokenizer corpus, truncated
  at the model's max_seq_length as sentence-transformers truncates.

A build stores the recorded reference in the bundle (``reference_files`` and ``EmbeddingReferenceConfig``:
the embeddings, every text's token states, and a JSON config with the texts, ids and truncation), so a deploy
site re-checks an encoder without the checkpoint (``RecordedEmbeddings.from_stored``).
"""

# The texts are deliberately non-ASCII; RUF001 (confusable characters) would flag them.
# ruff: noqa: RUF001

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._io import Progress, no_progress
from sovpack._protocols import EmbeddingRunner
from sovpack.encoder_reference import EncoderReference
from sovpack.errors import ParityError, UsageError, VerificationError
from sovpack.parity.judge import judge_metric, tokenizer_check, verdict
from sovpack.parity.metrics import check_tokenizer
from sovpack.parity.prompts import TOKENIZER_CORPUS
from sovpack.parity.report import AggregateMetrics, EmbeddingResult, ParityReport, TextEmbedding
from sovpack.parity.thresholds import Thresholds
from sovpack.source.model import SourceModel
from sovpack.source.tokenizer import SourceTokenizer

# The sentence-transformers model card's own examples first (a user sees eating food ~ eating pasta, not ~ a
# movie), then other scripts, code, a one-word text and one longer than the tiny fixtures' max_seq_length.
LABELED_TEXTS: dict[str, str] = {
    "food": "A man is eating food.",
    "pasta": "A man is eating pasta.",
    "movie": "The new movie is awesome.",
    "french": "Le chat dort sur le canapé pendant que la pluie tombe.",
    "german": "Die Straßenbahn fährt über die Brücke, während die Kinder spielen.",
    "chinese": "今天天气很好，我们去公园散步吧。",
    "russian": "Москва — столица России.",
    "code": "def add(a: int, b: int) -> int:\n    return a + b",
    "short": "ok",
    "long": (
        "Sovereign deployments run open-weight models on their own hardware, often without any network, and "
        "every artifact they install must be proven correct before it serves a single query: the embedding "
        "model that ranks documents for retrieval is held to the same standard as the chat model that answers."
    ),
}


# The tokenizer check of an encoder covers the texts embedded as well as the shared corpus, so a text whose
# tokens differ is either a divergence the target declares (and then not judged through the pipeline) or a
# tokenizer failure.
ENCODER_TOKENIZER_CORPUS: list[str] = list(dict.fromkeys([*TOKENIZER_CORPUS, *LABELED_TEXTS.values()]))


# The stored form (a bundle's parity reference manifest for an encoder): its config media type tells it from a
# decoder's logits reference; the manifest itself is the same parity-reference artifact.
MT_EMBEDDING_REFERENCE_CONFIG = "application/vnd.sovpack.embedding-reference.config.v1+json"
MT_REFERENCE_EMBEDDINGS = "application/vnd.sovpack.reference-embeddings.v1.npy"
REFERENCE_EMBEDDINGS = "embeddings.npy"
REFERENCE_TOKEN_STATES = "token-states.npy"


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceText:
    """One embedded text as the reference saw it; its token states follow the earlier texts' in ``token_states``."""

    index: int
    label: str
    text: str
    ids: tuple[int, ...]
    truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "text": self.text, "ids": list(self.ids),
                "truncated": self.truncated}


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingReferenceConfig:
    """The config of an encoder's stored parity reference (``schemas/embedding-reference.schema.json``)."""

    schema_version: int = 1
    dimension: int
    max_length: int
    tokenizer: str | None
    embeddings: str  # layer title: float32 [texts, dimension]
    token_states: str  # layer title: float32 [sum of the texts' token counts, dimension], texts in order
    reference_runtime: Mapping[str, str]
    texts: tuple[ReferenceText, ...]

    @property
    def token_count(self) -> int:
        return sum(len(t.ids) for t in self.texts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dimension": self.dimension,
            "max_length": self.max_length,
            "tokenizer": self.tokenizer,
            "embeddings": self.embeddings,
            "token_states": self.token_states,
            "reference_runtime": dict(self.reference_runtime),
            "texts": [t.to_dict() for t in self.texts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbeddingReferenceConfig:
        """Validate against the schema and the facts it cannot say; VerificationError otherwise."""
        from jsonschema import ValidationError

        from sovpack._schemas import validate

        where = "embedding reference config"
        if not isinstance(data, Mapping):
            raise VerificationError(f"{where} is invalid: not a JSON object")
        try:
            validate(dict(data), "embedding-reference")
        except ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            raise VerificationError(f"{where} is invalid at '{path or '/'}': {e.message}") from None
        texts = tuple(
            ReferenceText(index=int(t["index"]), label=str(t["label"]), text=str(t["text"]),
                          ids=tuple(int(i) for i in t["ids"]), truncated=bool(t["truncated"]))
            for t in data["texts"]
        )
        labels = [t.label for t in texts]
        if [t.index for t in texts] != list(range(len(texts))) or len(set(labels)) != len(labels):
            raise VerificationError(f"{where} is invalid: texts must be numbered 0.. in order with distinct labels")
        too_long = [t.label for t in texts if len(t.ids) > int(data["max_length"])]
        if too_long:
            raise VerificationError(f"{where} is invalid: texts {too_long} have more ids than max_length")
        if data["embeddings"] == data["token_states"] or data["tokenizer"] in (data["embeddings"],
                                                                                data["token_states"]):
            raise VerificationError(f"{where} is invalid: its layers must have distinct titles")
        return cls(
            schema_version=int(data["schema_version"]),
            dimension=int(data["dimension"]),
            max_length=int(data["max_length"]),
            tokenizer=data["tokenizer"],
            embeddings=str(data["embeddings"]),
            token_states=str(data["token_states"]),
            reference_runtime={str(k): str(v) for k, v in data["reference_runtime"].items()},
            texts=texts,
        )


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedEmbeddings:
    """The reference's answers for one encoder: texts, their (truncated) token ids, embeddings and token states."""

    labels: tuple[str, ...]
    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    truncated: tuple[bool, ...]  # the source tokenizer cut the text at max_seq_length
    embeddings: np.ndarray  # [texts, hidden]
    hidden: tuple[np.ndarray, ...]  # per text [tokens, hidden]
    max_length: int
    runtime: Mapping[str, str]

    # -- the stored form -----------------------------------------------------------------------------------
    def reference_config(self, tokenizer: str | None) -> EmbeddingReferenceConfig:
        """What a bundle stores beside ``reference_files()``; ``tokenizer``: the title of its tokenizer.json layer."""
        return EmbeddingReferenceConfig(
            dimension=int(self.embeddings.shape[1]),
            max_length=self.max_length,
            tokenizer=tokenizer,
            embeddings=REFERENCE_EMBEDDINGS,
            token_states=REFERENCE_TOKEN_STATES,
            reference_runtime={str(k): str(v) for k, v in self.runtime.items()},
            texts=tuple(
                ReferenceText(index=i, label=label, text=text, ids=ids, truncated=cut)
                for i, (label, text, ids, cut) in enumerate(
                    zip(self.labels, self.texts, self.ids, self.truncated, strict=True))
            ),
        )

    def reference_files(self) -> list[tuple[str, bytes]]:
        """(layer title, .npy bytes): the embeddings [texts, dim] and all token states [tokens, dim], float32.

        The token states are small (tokens x hidden x 4 bytes: 0.3 MB for MiniLM on the built-in texts) and are
        what judges ``max_hidden_abs``, so they are always stored; one array, the texts' rows in order.
        """
        width = self.embeddings.shape[1]
        states = np.concatenate(list(self.hidden)) if self.hidden else np.zeros((0, width), np.float32)
        return [(REFERENCE_EMBEDDINGS, _npy(self.embeddings)), (REFERENCE_TOKEN_STATES, _npy(states))]

    @classmethod
    def from_stored(cls, config: EmbeddingReferenceConfig, embeddings: np.ndarray, token_states: np.ndarray
                    ) -> RecordedEmbeddings:
        """The recorded reference read back from a bundle; arrays that do not fit the config raise."""
        count, width = len(config.texts), config.dimension
        for title, array, shape in ((config.embeddings, embeddings, (count, width)),
                                    (config.token_states, token_states, (config.token_count, width))):
            if array.dtype != np.float32 or array.shape != shape:
                raise VerificationError(f"embedding reference {title}: {array.dtype} {list(array.shape)} does not "
                                        f"fit its config (float32 {list(shape)})")
            if not np.isfinite(array).all():
                raise VerificationError(f"embedding reference {title}: holds non-finite values")
        bounds = np.cumsum([0, *(len(t.ids) for t in config.texts)])
        return cls(
            labels=tuple(t.label for t in config.texts),
            texts=tuple(t.text for t in config.texts),
            ids=tuple(t.ids for t in config.texts),
            truncated=tuple(t.truncated for t in config.texts),
            embeddings=np.asarray(embeddings),
            hidden=tuple(np.asarray(token_states[a:b]) for a, b in pairwise(bounds)),
            max_length=config.max_length,
            runtime={**config.reference_runtime, "stored": "true"},
        )


def labeled_texts(texts: Sequence[str]) -> dict[str, str] | None:
    """The user's texts labeled ``text 1``, ``text 2``, ...; None (the built-in LABELED_TEXTS) when none."""
    return {f"text {i + 1}": text for i, text in enumerate(texts)} or None


def max_input_length(model: SourceModel) -> int:
    """Tokens one input may have: max_seq_length, capped by the positions the model has."""
    encoder = model.spec.encoder
    if encoder is None:
        raise UsageError(f"{model.path}: {model.spec.family} is not an embedding encoder")
    return model.spec.max_input_tokens()


def record_embeddings(model: SourceModel, texts: Mapping[str, str] | None = None,
                      progress: Progress = no_progress) -> RecordedEmbeddings:
    """Run the numpy reference once on every text (one padded batch) and keep what parity compares."""
    labeled = dict(texts or LABELED_TEXTS)
    tokenizer_json = model.checkpoint.tokenizer_json
    if tokenizer_json is None:
        raise UsageError(f"{model.path}: embedding parity needs the checkpoint's tokenizer.json")
    limit = max_input_length(model)
    full = SourceTokenizer(tokenizer_json)
    tokenizer = SourceTokenizer(tokenizer_json, max_length=limit)
    ids = [tokenizer.encode(text) for text in labeled.values()]
    progress("reference: embeddings", 0, 1)
    reference = EncoderReference(model)
    try:
        out = reference.encode(ids)
    finally:
        reference.close()
    progress("reference: embeddings", 1, 1)
    return RecordedEmbeddings(
        labels=tuple(labeled),
        texts=tuple(labeled.values()),
        ids=tuple(tuple(x) for x in ids),
        truncated=tuple(len(full.encode(text)) > limit for text in labeled.values()),
        embeddings=out.embeddings,
        hidden=tuple(out.hidden[b, : len(x)] for b, x in enumerate(ids)),
        max_length=limit,
        runtime=reference.runtime_info(),
    )


def _cosines(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    norms = np.linalg.norm(e, axis=1) * np.linalg.norm(a, axis=1)
    cosine = np.where(norms > 0, (e * a).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
    return np.clip(cosine, -1.0, 1.0)


def _embeddings_of(value: object, count: int, width: int, what: str, target: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32) if value is not None else None
    if array is None or array.shape != (count, width):
        shape = None if array is None else list(array.shape)
        raise ParityError(f"{target}: {what} returned embeddings of shape {shape}, expected {[count, width]}")
    return array


def check_embedding_parity(
    recorded: RecordedEmbeddings,
    runner: EmbeddingRunner,
    *,
    target: str,
    precision: str,
    thresholds: Thresholds,
    tokenizer_json: Path | None,
    known_tokenizer_divergences: Sequence[str] = (),
    tokenizer_corpus: Sequence[str] = ENCODER_TOKENIZER_CORPUS,
) -> ParityReport:
    """Judge an encoder artifact's runner against the recorded reference (see the module docstring)."""
    count, width = recorded.embeddings.shape
    graph = runner.embed_ids([list(x) for x in recorded.ids])
    embeddings = _embeddings_of(graph.embeddings, count, width, "embed_ids", target)
    cosine = _cosines(recorded.embeddings, embeddings)
    hidden_err: list[float | None] = [None] * count
    if graph.hidden is not None:
        states = np.asarray(graph.hidden, dtype=np.float32)
        for b, expected in enumerate(recorded.hidden):
            if states.ndim != 3 or states.shape[0] != count or states.shape[1] < len(expected):
                raise ParityError(f"{target}: embed_ids returned token states of shape {list(states.shape)}")
            hidden_err[b] = float(np.abs(states[b, : len(expected)] - expected).max())
    pipeline = runner.embed_texts(list(recorded.texts))
    pipeline_cos: list[float | None] = [None] * count
    if pipeline is not None:
        judged = _cosines(recorded.embeddings, _embeddings_of(pipeline, count, width, "embed_texts", target))
        # NOTE: through the pipeline only texts it tokenizes as the source does, uncut, are judged: a declared
        # tokenizer divergence or a truncation rule of the runtime is the tokenizer check's to judge.
        own = [runner.tokenize(text) for text in recorded.texts]
        alike = [tokens is None or list(tokens) == list(ids) for tokens, ids in zip(own, recorded.ids, strict=True)]
        pipeline_cos = [float(c) if same and not cut else None
                        for c, same, cut in zip(judged, alike, recorded.truncated, strict=True)]
    per_text = tuple(
        TextEmbedding(label=label, tokens=len(ids), truncated=cut, cosine=float(c), hidden_max_abs=h,
                      pipeline_cosine=p)
        for label, ids, cut, c, h, p in zip(recorded.labels, recorded.ids, recorded.truncated, cosine, hidden_err,
                                           pipeline_cos, strict=True)
    )
    result = EmbeddingResult.of(per_text, dimension=width, pipeline=pipeline is not None)
    tokenizer = check_tokenizer(runner, tokenizer_json, tokenizer_corpus, known_tokenizer_divergences,
                                target=target, max_length=recorded.max_length)
    t, f = thresholds, thresholds.warn_factor
    checks = []
    worst = min(per_text, key=lambda x: x.cosine).label
    if t.min_cosine is not None:
        checks.append(judge_metric("min_cosine", "min", result.min_cosine, t.min_cosine, f, f"text {worst!r}", ""))
        if result.pipeline_min_cosine is not None:
            judged_texts = [x for x in per_text if x.pipeline_cosine is not None]
            p_worst = min(judged_texts, key=lambda x: x.pipeline_cosine or 0.0).label
            checks.append(judge_metric("pipeline_min_cosine", "min", result.pipeline_min_cosine, t.min_cosine, f,
                                       f"text {p_worst!r}", ""))
    if t.max_hidden_abs is not None:
        h_worst = max(per_text, key=lambda x: x.hidden_max_abs or 0.0).label
        checks.append(judge_metric("max_hidden_abs", "max", result.max_hidden_abs, t.max_hidden_abs, f,
                                   f"text {h_worst!r}", "the runtime exposes no token states"))
    checks.append(tokenizer_check(t, tokenizer))
    status, reasons = verdict(checks)
    return ParityReport(
        target=target,
        precision=precision.strip().lower(),
        status=status,
        reasons=reasons,
        thresholds=t,
        checks=tuple(checks),
        metrics=AggregateMetrics.none_compared(),
        prompts=(),
        tokenizer=tokenizer,
        max_new_tokens=0,
        runtime={
            "target": {str(k): str(v) for k, v in runner.runtime_info().items()},
            "reference": {str(k): str(v) for k, v in recorded.runtime.items()},
        },
        embeddings=result,
    )
