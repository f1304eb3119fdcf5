"""Parity for embedding encoders: each text's embedding on the artifact's runtime against the numpy reference's.

Three things are compared, all on one batch of texts of mixed lengths (right-padded, so padding must not leak):

- the graph: the runtime's pooled embedding for the reference's token ids, by cosine similarity per text
  (``min_cosine``), and its token states before pooling where it exposes them (``max_hidden_abs``);
- the runtime's own text pipeline (its tokenizer, truncation and pooling, as a user calls it), by the same
  cosine, on the texts short enough that no truncation applies (how a runtime truncates is the tokenizer
  check's business);
- the tokenizer: the artifact's token ids against the source tokenizer's on the tokenizer corpus, truncated
  at the model's max_seq_length as sentence-transformers truncates.
"""

# The texts are deliberately non-ASCII; RUF001 (confusable characters) would flag them.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sovpack._io import Progress, no_progress
from sovpack._protocols import EmbeddingRunner
from sovpack.encoder_reference import EncoderReference
from sovpack.errors import ParityError, UsageError
from sovpack.parity.judge import judge_metric, tokenizer_check
from sovpack.parity.metrics import check_tokenizer
from sovpack.parity.prompts import TOKENIZER_CORPUS
from sovpack.parity.report import AggregateMetrics, EmbeddingResult, ParityReport, Status, TextEmbedding
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


def max_input_length(model: SourceModel) -> int:
    """Tokens one input may have: max_seq_length, capped by the positions the model has."""
    encoder = model.spec.encoder
    if encoder is None:
        raise UsageError(f"{model.path}: {model.spec.family} is not an embedding encoder")
    positions = model.spec.max_position_embeddings - encoder.position_offset
    return min(encoder.pooling.max_seq_length or positions, positions)


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
    verdicts = {c.verdict for c in checks}
    status: Status = "FAILED" if "fail" in verdicts else "WARNED" if "warn" in verdicts else "PASSED"
    reasons = tuple(f"{c.verdict.upper()}: {c.detail}" for c in checks if c.verdict in ("fail", "warn") and c.detail)
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
