"""The parity report: typed, frozen records that round-trip through JSON valid against the schema."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from sovpack._io import atomic_write_bytes, read_json_file
from sovpack.errors import ParityError
from sovpack.parity.thresholds import Thresholds

PARITY_FILE = "parity.json"  # the report's name inside an artifact directory
MAX_REPORT_BYTES = 16 * 1024 * 1024
SCHEMA_VERSION = 1
SCHEMA_FILE = "parity-report.schema.json"
SIGNIFICANT_DIGITS = 9  # floats in reports are rounded to this many digits so reruns give identical bytes

# The mixture-of-experts fields: written only for MoE models, so dense reports are what they always were.
ROUTER_GREEDY_FIELDS = ("router_near_tie", "router_near_tie_steps")
ROUTER_PROMPT_FIELDS = ("router_near_ties", "router_tie_flips")
ROUTER_AGGREGATE_FIELDS = ("router_margin", "router_near_ties", "router_tie_flips", "greedy_router_ties")

Status = Literal["PASSED", "WARNED", "FAILED"]
Verdict = Literal["pass", "warn", "fail", "skipped"]
Bound = Literal["max", "min"]


def round_metric(value: float | None) -> float | None:
    """Round to SIGNIFICANT_DIGITS so a report's bytes do not depend on last-ulp noise; idempotent."""
    if value is None:
        return None
    rounded = float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")
    return rounded + 0.0  # -0.0 -> 0.0


def _without_none(data: dict[str, Any], optional: Sequence[str]) -> dict[str, Any]:
    """``data`` without those ``optional`` keys whose value is None."""
    return {k: v for k, v in data.items() if not (k in optional and v is None)}


@dataclass(frozen=True, kw_only=True, slots=True)
class GreedyResult:
    """Greedy continuations of one prompt on both sides and where they first part."""

    reference_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    matched_prefix: int  # tokens equal before the first divergence
    identical: bool
    divergence_margin: float | None  # reference logit of its token minus that of the target's, at divergence
    near_tie: bool  # the divergence happened where the reference's margin was below clear_margin
    agreement: float  # 1.0 if identical, near_tie or router_near_tie, else matched_prefix / longer length
    # Mixture of experts only (None, and absent from the JSON, for dense models): the divergence happened at a
    # row where the reference's router had a near-tie, and how many of the reference's tokens were chosen at one.
    router_near_tie: bool | None = None
    router_near_tie_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = _without_none(dataclasses.asdict(self), ROUTER_GREEDY_FIELDS)
        data["reference_ids"] = list(self.reference_ids)
        data["target_ids"] = list(self.target_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GreedyResult:
        values = dict(data)
        values["reference_ids"] = tuple(values["reference_ids"])
        values["target_ids"] = tuple(values["target_ids"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class PromptMetrics:
    """Logit and greedy metrics of one prompt. Logit metrics are None if no target row was finite."""

    index: int
    label: str | None
    n_tokens: int
    nonfinite_positions: int
    max_abs_error: float | None
    max_rel_error: float | None
    mean_kl: float | None
    max_kl: float | None
    clear_positions: int  # finite, top-1 margin >= clear_margin, and no router near-tie
    top1_agreement: float | None  # over clear positions; None if there were none
    top1_agreement_all: float | None  # over all finite positions, near-ties included (informational)
    greedy: GreedyResult | None  # None when greedy decoding was not compared (max_new_tokens == 0)
    # Mixture of experts only (None, and absent from the JSON, for dense models): prompt positions where the
    # reference's router had a near-tie, and finite ones among them whose top-1 differs (explained, not judged).
    router_near_ties: int | None = None
    router_tie_flips: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["greedy"] = self.greedy.to_dict() if self.greedy is not None else None
        return _without_none(data, ROUTER_PROMPT_FIELDS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptMetrics:
        values = dict(data)
        greedy = values.get("greedy")
        values["greedy"] = GreedyResult.from_dict(greedy) if greedy is not None else None
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class AggregateMetrics:
    """Metrics over all prompts: maxima of maxima, position-weighted means, pooled top-1 counts."""

    prompts: int
    positions: int
    nonfinite_positions: int
    max_abs_error: float | None
    max_rel_error: float | None
    mean_kl: float | None
    max_kl: float | None
    clear_positions: int
    top1_agreement: float | None
    top1_agreement_all: float | None
    greedy_agreement: float | None  # mean of per-prompt agreements; None when greedy was not compared
    greedy_identical: int  # prompts whose continuations are identical
    greedy_near_ties: int  # prompts whose continuations parted at an excused near-tie
    # Mixture of experts only (None, and absent from the JSON, for dense models). router_margin: a router gap
    # (see sovpack.reference.router_gap) below it is a near-tie; the counts sum the prompts' (see PromptMetrics);
    # greedy_router_ties: prompts whose continuations parted at a router near-tie (excused).
    router_margin: float | None = None
    router_near_ties: int | None = None
    router_tie_flips: int | None = None
    greedy_router_ties: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _without_none(dataclasses.asdict(self), ROUTER_AGGREGATE_FIELDS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregateMetrics:
        return cls(**dict(data))

    @classmethod
    def none_compared(cls) -> AggregateMetrics:
        """No logits compared: an embedding encoder's report (its numbers are in ParityReport.embeddings)."""
        return cls(prompts=0, positions=0, nonfinite_positions=0, max_abs_error=None, max_rel_error=None,
                   mean_kl=None, max_kl=None, clear_positions=0, top1_agreement=None, top1_agreement_all=None,
                   greedy_agreement=None, greedy_identical=0, greedy_near_ties=0)


@dataclass(frozen=True, kw_only=True, slots=True)
class TextEmbedding:
    """One text of an encoder's parity run: its token count, whether max_seq_length cut it, the cosine of the
    runtime's embedding (from the reference's ids) to the reference's, the token states' max |d| (None where the
    runtime exposes none) and the cosine through the runtime's own text pipeline (None: not judged)."""

    label: str
    tokens: int
    truncated: bool
    cosine: float
    hidden_max_abs: float | None
    pipeline_cosine: float | None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cosine": round_metric(self.cosine),
                "hidden_max_abs": round_metric(self.hidden_max_abs),
                "pipeline_cosine": round_metric(self.pipeline_cosine)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextEmbedding:
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True, slots=True)
class EmbeddingResult:
    """An embedding encoder's parity numbers: per text and their extremes (see sovpack.parity.embeddings)."""

    dimension: int
    min_cosine: float
    max_hidden_abs: float | None
    pipeline_min_cosine: float | None
    texts: tuple[TextEmbedding, ...]

    @classmethod
    def of(cls, texts: Sequence[TextEmbedding], *, dimension: int, pipeline: bool) -> EmbeddingResult:
        hidden = [t.hidden_max_abs for t in texts if t.hidden_max_abs is not None]
        piped = [t.pipeline_cosine for t in texts if t.pipeline_cosine is not None]
        return cls(
            dimension=dimension,
            min_cosine=min(t.cosine for t in texts),
            max_hidden_abs=max(hidden) if hidden else None,
            pipeline_min_cosine=min(piped) if pipeline and piped else None,
            texts=tuple(texts),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dimension": self.dimension,
            "min_cosine": round_metric(self.min_cosine),
            "max_hidden_abs": round_metric(self.max_hidden_abs),
            "pipeline_min_cosine": round_metric(self.pipeline_min_cosine),
            "texts": [t.to_dict() for t in self.texts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbeddingResult:
        return cls(**{**data, "texts": tuple(TextEmbedding.from_dict(t) for t in data["texts"])})


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerMismatch:
    """One corpus text the two tokenizers encode differently."""

    text: str
    expected_ids: tuple[int, ...]  # source tokenizer.json
    actual_ids: tuple[int, ...]  # the runner's tokenizer
    known: bool  # listed as a known divergence of this target: reported, not judged

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "expected_ids": list(self.expected_ids),
            "actual_ids": list(self.actual_ids),
            "known": self.known,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerMismatch:
        return cls(
            text=data["text"],
            expected_ids=tuple(data["expected_ids"]),
            actual_ids=tuple(data["actual_ids"]),
            known=data["known"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizerResult:
    """Tokenizer parity over the corpus, or why it was skipped."""

    status: Literal["checked", "skipped"]
    skipped_reason: str | None = None
    total: int = 0
    matched: int = 0
    known_divergent: int = 0  # mismatches on texts listed as known divergences
    mismatched: int = 0  # unexpected mismatches: these are judged
    examples: tuple[TokenizerMismatch, ...] = ()  # up to MAX_MISMATCH_EXAMPLES, unexpected ones first

    @property
    def agreement(self) -> float | None:
        return self.matched / self.total if self.status == "checked" and self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "skipped_reason": self.skipped_reason,
            "total": self.total,
            "matched": self.matched,
            "known_divergent": self.known_divergent,
            "mismatched": self.mismatched,
            "examples": [e.to_dict() for e in self.examples],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenizerResult:
        values = dict(data)
        values["examples"] = tuple(TokenizerMismatch.from_dict(e) for e in values.get("examples", ()))
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class Check:
    """One judged metric: its value, limit, warn limit (None = no failing level) and verdict."""

    metric: str
    bound: Bound
    value: float | None
    limit: float
    warn_limit: float | None
    verdict: Verdict
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Check:
        return cls(**dict(data))


@dataclass(frozen=True, kw_only=True, slots=True)
class ParityReport:
    """The outcome of one parity check: verdict, reasons, thresholds, metrics and both runtimes."""

    schema_version: int = SCHEMA_VERSION
    target: str
    precision: str
    status: Status
    reasons: tuple[str, ...]
    thresholds: Thresholds
    checks: tuple[Check, ...]
    metrics: AggregateMetrics
    prompts: tuple[PromptMetrics, ...]
    tokenizer: TokenizerResult
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    runtime: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # "target" / "reference" -> info
    # Embedding encoders: what was compared instead of logits (then metrics compare nothing and prompts is empty).
    embeddings: EmbeddingResult | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.embeddings is None else {"embeddings": self.embeddings.to_dict()}
        return {
            **extra,
            "schema_version": self.schema_version,
            "target": self.target,
            "precision": self.precision,
            "status": self.status,
            "reasons": list(self.reasons),
            "thresholds": self.thresholds.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "metrics": self.metrics.to_dict(),
            "prompts": [p.to_dict() for p in self.prompts],
            "tokenizer": self.tokenizer.to_dict(),
            "max_new_tokens": self.max_new_tokens,
            "stop_ids": list(self.stop_ids),
            "runtime": {side: dict(info) for side, info in self.runtime.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParityReport:
        """Build a report from its dict form; validates against the schema first (ParityError if invalid)."""
        validate_report(data)
        return cls(
            schema_version=data["schema_version"],
            target=data["target"],
            precision=data["precision"],
            status=data["status"],
            reasons=tuple(data["reasons"]),
            thresholds=Thresholds.from_dict(data["thresholds"]),
            checks=tuple(Check.from_dict(c) for c in data["checks"]),
            metrics=AggregateMetrics.from_dict(data["metrics"]),
            prompts=tuple(PromptMetrics.from_dict(p) for p in data["prompts"]),
            tokenizer=TokenizerResult.from_dict(data["tokenizer"]),
            max_new_tokens=data["max_new_tokens"],
            stop_ids=tuple(data["stop_ids"]),
            runtime={side: dict(info) for side, info in data["runtime"].items()},
            embeddings=EmbeddingResult.from_dict(data["embeddings"]) if "embeddings" in data else None,
        )

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, indent 2, trailing newline, rounded floats, no NaN."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (temporary sibling, then os.replace): readers never see half a report."""
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> ParityReport:
        """Read and validate a saved report; errors name the file."""
        return cls.parse(read_json_file(Path(path), MAX_REPORT_BYTES, error=ParityError), str(path))

    @classmethod
    def parse(cls, data: Any, where: str) -> ParityReport:
        """A report from an already parsed JSON document; errors name ``where``."""
        try:
            return cls.from_dict(data)
        except ParityError as e:
            raise ParityError(f"{where}: {e}") from e

    @property
    def notes(self) -> tuple[str, ...]:
        """Informational lines to print beside the reasons: what was measured but explained, not judged."""
        m = self.metrics
        if self.embeddings is not None:
            e = self.embeddings
            cut = [t.label for t in e.texts if t.truncated]
            return (f"embeddings: {len(e.texts)} texts, dimension {e.dimension}, min cosine {e.min_cosine:.7f}"
                    + (f", through the runtime's own pipeline {e.pipeline_min_cosine:.7f}"
                       if e.pipeline_min_cosine is not None else "")
                    + (f" ({', '.join(cut)} cut at max_seq_length: judged on ids only)" if cut else ""),)
        if m.router_margin is None:
            return ()
        line = (
            f"router near-ties: {m.router_near_ties} of {m.positions} prompt positions (the reference's k-th and "
            f"(k+1)-th expert logits less than {m.router_margin:.4g} x the token's largest |router logit| apart)"
        )
        explained = [f"{m.router_tie_flips} top-1 flip(s)"] if m.router_tie_flips else []
        explained += [f"{m.greedy_router_ties} greedy divergence(s)"] if m.greedy_router_ties else []
        return (line + (f"; {' and '.join(explained)} there explained, not judged" if explained else ""),)

    def raise_if_failed(self) -> None:
        """Raise ParityError carrying the reasons if the verdict is FAILED."""
        if self.status == "FAILED":
            raise ParityError(f"{self.target}: parity FAILED: " + "; ".join(self.reasons))


# ------------------------------------------------------------------------------------------------ schema


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    text = resources.files("sovpack.schemas").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_report(data: Mapping[str, Any]) -> None:
    """Validate a report's dict form against sovpack/schemas/parity-report.schema.json (ParityError if not)."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ParityError(f"not a valid parity report (schema v{SCHEMA_VERSION}) at {where}: {error.message}")
