"""The parity harness: does an artifact, run on its own runtime, compute what the source model computes?

Every target opens a :class:`Runner` on its artifact; :func:`check_parity` compares it with the numpy reference
on the same token ids and returns a :class:`ParityReport` with a verdict:

- PASSED: every judged metric is within its threshold.
- WARNED: some metric is past its threshold but inside the warn band (see :class:`Thresholds`): worth a look,
  not a broken artifact. Runtimes differ in summation order and kernel fusion, so a hard edge would flap.
- FAILED: some metric is past the warn band, the target produced NaN/Inf logits, or its tokenizer encodes
  the corpus differently from the source tokenizer.

Metrics, per prompt and aggregated over all prompts:

- ``max_abs_error``: the largest |reference - target| logit difference.
- ``max_rel_error``: per position, the largest difference divided by the reference's largest |logit| there;
  the maximum over positions. Scale-free, so it means the same for a tiny fixture and a 70B model.
- ``mean_kl``: KL(reference || target) of the next-token distributions, in nats, averaged over positions.
- ``top1_agreement``: how often the target's argmax equals the reference's, counted only at *clear*
  positions, where the reference's top-1 logit beats its top-2 by at least ``clear_margin``; at near-ties a
  flip is legitimate rounding, not a bug.
- ``greedy_agreement``: greedy decoding through each side's own KV cache. Per prompt, the fraction of tokens
  generated before the first divergence; a divergence where the reference itself was at a near-tie
  (margin below ``clear_margin`` between its token and the target's) is excused and counts as agreement.
- tokenizer agreement: if the runner carries a tokenizer, it must encode :data:`TOKENIZER_CORPUS` exactly as
  the source tokenizer.json does (known, documented divergences are reported but not judged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from sovpack.errors import ParityError, UsageError
from sovpack.prompts import TOKENIZER_CORPUS, load_tokenizer

SCHEMA_VERSION = 1
SCHEMA_FILE = "parity-report.schema.json"
DEFAULT_MAX_NEW_TOKENS = 8
MAX_MISMATCH_EXAMPLES = 5
SIGNIFICANT_DIGITS = 9  # floats in reports are rounded to this many digits so reruns give identical bytes
_ROW_CHUNK = 16  # logit rows compared at once: bounds float64 temporaries for large vocabularies

Status = Literal["PASSED", "WARNED", "FAILED"]
Verdict = Literal["pass", "warn", "fail", "skipped"]
Bound = Literal["max", "min"]


class ForwardPass(Protocol):
    """What the harness needs from both sides of a comparison (the reference has exactly this)."""

    name: str

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, vocab] (float32) from one forward pass over ``ids``."""
        ...

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Generated ids only (a produced stop token included), decoded through the runtime's own KV cache."""
        ...

    def runtime_info(self) -> dict[str, str]:
        """Runtime name/version, device, precision hints: recorded in the report for provenance."""
        ...


class Runner(ForwardPass, Protocol):
    """An artifact opened in its own runtime, as every target provides it for checking.

    ``tokenize`` encodes text as a prompt (with the special tokens the model's tokenizer adds, e.g. BOS),
    using the artifact's own tokenizer; it returns None if the artifact carries none. The harness also treats
    a missing ``tokenize`` attribute as "no tokenizer", which is how the reference appears.
    """

    def tokenize(self, text: str) -> list[int] | None: ...


# --------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True, kw_only=True, slots=True)
class Thresholds:
    """Limits for one precision. A limit of None means that metric is not judged.

    Upper-bound metrics (``max_abs``, ``max_rel``, ``mean_kl``) pass at or below the limit, warn up to
    ``warn_factor`` x the limit, and fail beyond. Lower-bound fractions (``min_top1``, ``min_greedy``) pass at
    or above the limit and warn while the shortfall ``1 - value`` is at most ``warn_factor`` x the allowed
    shortfall ``1 - limit`` (but never below ``limit / warn_factor``); a limit of 1.0 is an exact requirement
    with no warn band. ``tokenizer_exact`` makes any unexpected tokenizer mismatch a failure (else a warning).
    """

    max_abs: float | None
    max_rel: float | None
    mean_kl: float | None
    min_top1: float | None
    min_greedy: float | None
    clear_margin: float
    tokenizer_exact: bool = True
    warn_factor: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_abs", "max_rel", "mean_kl", "min_top1", "min_greedy", "clear_margin", "warn_factor"):
            value = getattr(self, name)
            if value is None and name not in ("clear_margin", "warn_factor"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UsageError(f"threshold {name} must be a finite number, got {value!r}")
            if value < 0:
                raise UsageError(f"threshold {name} must not be negative, got {value!r}")
        for name in ("min_top1", "min_greedy"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise UsageError(f"threshold {name} is a fraction in [0, 1], got {value!r}")
        if self.warn_factor < 1:
            raise UsageError(f"threshold warn_factor must be at least 1, got {self.warn_factor!r}")
        if not isinstance(self.tokenizer_exact, bool):
            raise UsageError(f"threshold tokenizer_exact must be true or false, got {self.tokenizer_exact!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        return cls(**dict(data))


def _thresholds_table() -> dict[str, Thresholds]:
    """Build DEFAULT_THRESHOLDS: one entry per precision name, aliases sharing one Thresholds."""
    groups: list[tuple[tuple[str, ...], Thresholds]] = [
        # fp32 artifacts compute what the reference computes; differences come only from summation order,
        # fused kernels (e.g. fused attention, FMA) and approximate transcendentals. Those stay around 1e-5
        # relative to the logit scale; 1e-3 absolute leaves room for 30-40 logit magnitudes of large models.
        # clear_margin = 2 x max_abs: a target within max_abs cannot flip a clear position, so top-1 and
        # greedy are exact requirements.
        (
            ("fp32", "f32", "float32"),
            Thresholds(max_abs=1e-3, max_rel=1e-4, mean_kl=1e-6, min_top1=1.0, min_greedy=1.0, clear_margin=2e-3),
        ),
        # fp16 rounds every weight to 11 significant bits (relative error <= 4.9e-4) and runtimes may keep
        # fp16 activations; logits of real models then differ by ~0.01-0.1, so 0.25 absolute / 2% of the
        # logit scale. KL of such perturbations is ~1e-4 nats. clear_margin = 2 x max_abs again; top-1 and
        # greedy tolerate one odd position in ~100 (fp16 accumulation in some kernels).
        (
            ("fp16", "f16", "float16", "half"),
            Thresholds(max_abs=0.25, max_rel=2e-2, mean_kl=1e-3, min_top1=0.99, min_greedy=0.9, clear_margin=0.5),
        ),
        # bf16 keeps only 8 significant bits (relative error <= 3.9e-3, 8x fp16): logit differences of ~0.1-1
        # are normal for real models, KL a few 1e-3.
        (
            ("bf16", "bfloat16"),
            Thresholds(max_abs=1.0, max_rel=6e-2, mean_kl=1e-2, min_top1=0.97, min_greedy=0.8, clear_margin=2.0),
        ),
        # Quantized weights move every logit, so absolute error is not judged; distributions are (KL, top-1,
        # greedy). max_rel stays as a loose sanity bound that catches a scrambled position the mean KL would
        # dilute. KL limits sit ~3-5x above what llama.cpp's KL-divergence measurements report for 7-8B
        # models (q8_0 ~1e-3, q6_k ~4e-3, q5_k_m ~1e-2, q4_k_m ~3e-2, q4_0 ~6e-2 nats); small models
        # quantize worse, and the warn band doubles the room. Clear margins are in logits (1.0 = the top
        # token is e ~ 2.7x as likely as the runner-up).
        (
            ("int8", "int8_sym", "int8_asym", "q8_0"),
            Thresholds(max_abs=None, max_rel=0.2, mean_kl=5e-3, min_top1=0.98, min_greedy=0.75, clear_margin=1.0),
        ),
        (
            ("q6_k",),
            Thresholds(max_abs=None, max_rel=0.25, mean_kl=1e-2, min_top1=0.97, min_greedy=0.7, clear_margin=1.0),
        ),
        (
            ("q5_k_m", "q5_k_s", "q5_0", "q5_1"),
            Thresholds(max_abs=None, max_rel=0.35, mean_kl=3e-2, min_top1=0.95, min_greedy=0.6, clear_margin=1.5),
        ),
        (
            ("q4_k_m", "q4_k_s"),
            Thresholds(max_abs=None, max_rel=0.5, mean_kl=0.1, min_top1=0.92, min_greedy=0.5, clear_margin=2.0),
        ),
        (
            ("int4", "int4_sym", "int4_asym", "q4_0", "q4_1"),
            Thresholds(max_abs=None, max_rel=0.6, mean_kl=0.2, min_top1=0.9, min_greedy=0.5, clear_margin=2.0),
        ),
    ]
    return {name: thresholds for names, thresholds in groups for name in names}


DEFAULT_THRESHOLDS: dict[str, Thresholds] = _thresholds_table()
THRESHOLD_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Thresholds))


def thresholds_for(precision: str, overrides: Mapping[str, float | bool | None] | None = None) -> Thresholds:
    """The default thresholds for ``precision`` with ``overrides`` (field name -> value; None = not judged)."""
    key = precision.strip().lower()
    base = DEFAULT_THRESHOLDS.get(key)
    if base is None:
        known = ", ".join(sorted(DEFAULT_THRESHOLDS))
        raise UsageError(f"no parity thresholds for precision {precision!r}; known precisions: {known}")
    if not overrides:
        return base
    unknown = sorted(set(overrides) - set(THRESHOLD_KEYS))
    if unknown:
        raise UsageError(f"unknown threshold name(s) {', '.join(unknown)}; known: {', '.join(THRESHOLD_KEYS)}")
    return Thresholds.from_dict({**base.to_dict(), **overrides})


def parse_threshold_overrides(items: Iterable[str]) -> dict[str, float | bool | None]:
    """Parse ``name=value`` strings (as given on a command line): numbers, ``none``, or true/false."""
    parsed: dict[str, float | bool | None] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise UsageError(f"threshold override {item!r} is not of the form name=value")
        if name not in THRESHOLD_KEYS:
            raise UsageError(f"unknown threshold name {name!r}; known: {', '.join(THRESHOLD_KEYS)}")
        lowered = raw.lower()
        if name == "tokenizer_exact":
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise UsageError(f"threshold override {item!r}: tokenizer_exact takes true or false")
            parsed[name] = lowered in ("true", "1", "yes")
        elif lowered in ("none", "off"):
            parsed[name] = None
        else:
            try:
                parsed[name] = float(raw)
            except ValueError:
                raise UsageError(f"threshold override {item!r}: {raw!r} is not a number") from None
    return parsed


# ------------------------------------------------------------------------------------------ report types


def _round(value: float | None) -> float | None:
    """Round to SIGNIFICANT_DIGITS so a report's bytes do not depend on last-ulp noise; idempotent."""
    if value is None:
        return None
    rounded = float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")
    return rounded + 0.0  # -0.0 -> 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class GreedyResult:
    """Greedy continuations of one prompt on both sides and where they first part."""

    reference_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    matched_prefix: int  # tokens equal before the first divergence
    identical: bool
    divergence_margin: float | None  # reference logit of its token minus that of the target's, at divergence
    near_tie: bool  # the divergence happened where the reference's margin was below clear_margin
    agreement: float  # 1.0 if identical or near_tie, else matched_prefix / longer length

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
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
    clear_positions: int
    top1_agreement: float | None  # over clear positions; None if there were none
    top1_agreement_all: float | None  # over all finite positions, near-ties included (informational)
    greedy: GreedyResult | None  # None when greedy decoding was not compared (max_new_tokens == 0)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["greedy"] = self.greedy.to_dict() if self.greedy is not None else None
        return data

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregateMetrics:
        return cls(**dict(data))


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

    def to_dict(self) -> dict[str, Any]:
        return {
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
        )

    def to_json(self) -> str:
        """Deterministic JSON: sorted keys, indent 2, trailing newline, rounded floats, no NaN."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the JSON atomically (temporary sibling, then os.replace): readers never see half a report."""
        path = Path(path)
        data = self.to_json().encode("utf-8")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | Path) -> ParityReport:
        """Read and validate a saved report; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ParityError(f"{path}: cannot read parity report: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ParityError(f"{path}: not a JSON parity report: {e}") from e
        try:
            return cls.from_dict(data)
        except ParityError as e:
            raise ParityError(f"{path}: {e}") from e

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


# ----------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True, kw_only=True, slots=True)
class _PositionStats:
    """Per-position comparison of one prompt's logits (internal; float64)."""

    finite: np.ndarray  # bool [T]: target row has no NaN/Inf
    max_abs: np.ndarray  # [T]
    rel: np.ndarray  # [T]
    kl: np.ndarray  # [T]
    ref_top1: np.ndarray  # int [T]
    tgt_top1: np.ndarray  # int [T]
    ref_margin: np.ndarray  # [T] reference top-1 minus top-2 logit


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _position_stats(ref: np.ndarray, tgt: np.ndarray) -> _PositionStats:
    """Compare two [T, vocab] logit arrays row chunk by row chunk, in float64."""
    steps = ref.shape[0]
    finite = np.isfinite(tgt).all(axis=-1)
    max_abs = np.full(steps, np.nan)
    rel = np.full(steps, np.nan)
    kl = np.full(steps, np.nan)
    tgt_top1 = np.full(steps, -1, dtype=np.int64)
    ref_top1 = np.argmax(ref, axis=-1).astype(np.int64)
    if ref.shape[1] > 1:
        top2 = np.partition(ref, -2, axis=-1)[:, -2:].astype(np.float64)
        ref_margin = top2[:, 1] - top2[:, 0]
    else:
        ref_margin = np.full(steps, np.inf)
    rows = np.flatnonzero(finite)
    for start in range(0, rows.size, _ROW_CHUNK):
        idx = rows[start : start + _ROW_CHUNK]
        r = ref[idx].astype(np.float64)
        t = tgt[idx].astype(np.float64)
        diff = np.abs(r - t).max(axis=-1)
        scale = np.abs(r).max(axis=-1)
        max_abs[idx] = diff
        rel[idx] = diff / np.maximum(scale, np.finfo(np.float32).tiny)
        log_p = _log_softmax(r)
        log_q = _log_softmax(t)
        kl[idx] = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)
        tgt_top1[idx] = np.argmax(t, axis=-1)
    return _PositionStats(
        finite=finite, max_abs=max_abs, rel=rel, kl=kl, ref_top1=ref_top1, tgt_top1=tgt_top1, ref_margin=ref_margin
    )


def _as_logits(value: Any, *, who: str, target: str, index: int, steps: int) -> np.ndarray:
    """A runner's prefill output as a 2-D float array of the right length, or ParityError."""
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[0] != steps or not np.issubdtype(array.dtype, np.floating):
        raise ParityError(
            f"{target}: {who} prefill_logits for prompt {index} returned shape {list(array.shape)} "
            f"({array.dtype}); expected a float array of shape [{steps}, vocab]"
        )
    return array


def _greedy_result(
    reference: ForwardPass,
    ids: Sequence[int],
    ref_tokens: list[int],
    tgt_tokens: list[int],
    clear_margin: float,
) -> GreedyResult:
    """Compare two continuations; at the first divergence ask the reference how close the call was."""
    matched = 0
    for a, b in zip(ref_tokens, tgt_tokens, strict=False):
        if a != b:
            break
        matched += 1
    identical = ref_tokens == tgt_tokens
    margin: float | None = None
    near_tie = False
    if not identical and matched < min(len(ref_tokens), len(tgt_tokens)):
        logits = np.asarray(reference.prefill_logits([*ids, *ref_tokens[:matched]]))[-1]
        alt = tgt_tokens[matched]
        if 0 <= alt < logits.shape[0]:
            margin = float(logits[ref_tokens[matched]]) - float(logits[alt])
            near_tie = margin < clear_margin
    longer = max(len(ref_tokens), len(tgt_tokens))
    agreement = 1.0 if identical or near_tie or longer == 0 else matched / longer
    return GreedyResult(
        reference_ids=tuple(ref_tokens),
        target_ids=tuple(tgt_tokens),
        matched_prefix=matched,
        identical=identical,
        divergence_margin=_round(margin),
        near_tie=near_tie,
        agreement=_round(agreement) or 0.0,
    )


def _token_list(value: Any, *, who: str, target: str, method: str) -> list[int]:
    try:
        return [int(t) for t in value]
    except (TypeError, ValueError) as e:
        raise ParityError(f"{target}: {who} {method} did not return a list of token ids: {e}") from e


def _prompt_metrics(
    reference: ForwardPass,
    runner: ForwardPass,
    *,
    target: str,
    index: int,
    label: str | None,
    ids: list[int],
    thresholds: Thresholds,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> tuple[PromptMetrics, _Pooled]:
    """Metrics of one prompt, plus what the aggregate pools: per-position KL and top-1 agreement counts."""
    steps = len(ids)
    ref = _as_logits(reference.prefill_logits(ids), who="reference", target=target, index=index, steps=steps)
    tgt = _as_logits(runner.prefill_logits(ids), who="target", target=target, index=index, steps=steps)
    if tgt.shape != ref.shape:
        raise ParityError(
            f"{target}: target logits for prompt {index} have shape {list(tgt.shape)}, "
            f"the reference's {list(ref.shape)} (vocabulary size differs?)"
        )
    if not np.isfinite(ref).all():
        raise ParityError(f"{target}: the reference produced NaN/Inf logits for prompt {index}; cannot compare")
    stats = _position_stats(ref, tgt)
    ok = stats.finite
    n_ok = int(ok.sum())
    clear = ok & (stats.ref_margin >= thresholds.clear_margin)
    n_clear = int(clear.sum())
    agree = stats.ref_top1 == stats.tgt_top1

    greedy = None
    if max_new_tokens > 0:
        ref_tokens = _token_list(
            reference.greedy(ids, max_new_tokens, stop_ids), who="reference", target=target, method="greedy"
        )
        tgt_tokens = _token_list(
            runner.greedy(ids, max_new_tokens, stop_ids), who="target", target=target, method="greedy"
        )
        greedy = _greedy_result(reference, ids, ref_tokens, tgt_tokens, thresholds.clear_margin)

    def stat(values: np.ndarray, reduce: Any) -> float | None:
        return _round(float(reduce(values[ok]))) if n_ok else None

    metrics = PromptMetrics(
        index=index,
        label=label,
        n_tokens=steps,
        nonfinite_positions=steps - n_ok,
        max_abs_error=stat(stats.max_abs, np.max),
        max_rel_error=stat(stats.rel, np.max),
        mean_kl=stat(stats.kl, np.mean),
        max_kl=stat(stats.kl, np.max),
        clear_positions=n_clear,
        top1_agreement=_round(float(agree[clear].mean())) if n_clear else None,
        top1_agreement_all=_round(float(agree[ok].mean())) if n_ok else None,
        greedy=greedy,
    )
    pooled = _Pooled(kl=stats.kl[ok], clear_agree=int(agree[clear].sum()), all_agree=int(agree[ok].sum()))
    return metrics, pooled


@dataclass(frozen=True, kw_only=True, slots=True)
class _Pooled:
    """Raw per-prompt quantities the aggregate pools exactly (internal)."""

    kl: np.ndarray  # per finite position
    clear_agree: int
    all_agree: int


def _aggregate(prompts: Sequence[PromptMetrics], pooled: Sequence[_Pooled]) -> AggregateMetrics:
    def worst(name: str) -> float | None:
        values = [getattr(p, name) for p in prompts if getattr(p, name) is not None]
        return max(values) if values else None

    pooled_kl = np.concatenate([p.kl for p in pooled]) if pooled else np.zeros(0)
    clear = sum(p.clear_positions for p in prompts)
    clear_agree = sum(p.clear_agree for p in pooled)
    finite = sum(p.n_tokens - p.nonfinite_positions for p in prompts)
    all_agree = sum(p.all_agree for p in pooled)
    greedy = [p.greedy for p in prompts if p.greedy is not None]
    return AggregateMetrics(
        prompts=len(prompts),
        positions=sum(p.n_tokens for p in prompts),
        nonfinite_positions=sum(p.nonfinite_positions for p in prompts),
        max_abs_error=worst("max_abs_error"),
        max_rel_error=worst("max_rel_error"),
        mean_kl=_round(float(pooled_kl.mean())) if pooled_kl.size else None,
        max_kl=worst("max_kl"),
        clear_positions=clear,
        top1_agreement=_round(clear_agree / clear) if clear else None,
        top1_agreement_all=_round(all_agree / finite) if finite else None,
        greedy_agreement=_round(sum(g.agreement for g in greedy) / len(greedy)) if greedy else None,
        greedy_identical=sum(g.identical for g in greedy),
        greedy_near_ties=sum(g.near_tie for g in greedy),
    )


# --------------------------------------------------------------------------------------------- tokenizer


def _check_tokenizer(
    runner: Any,
    tokenizer_json: Path | None,
    corpus: Sequence[str],
    known_divergences: Sequence[str],
    *,
    target: str,
) -> TokenizerResult:
    tokenize = getattr(runner, "tokenize", None)
    if tokenize is None:
        return TokenizerResult(status="skipped", skipped_reason="the target carries no tokenizer")
    if tokenizer_json is None:
        return TokenizerResult(status="skipped", skipped_reason="no source tokenizer.json to compare with")
    actual_all = [tokenize(text) for text in corpus]
    missing = sum(a is None for a in actual_all)
    if missing == len(corpus):
        return TokenizerResult(status="skipped", skipped_reason="the target carries no tokenizer")
    if missing:
        raise ParityError(f"{target}: tokenize returned None for {missing} of {len(corpus)} texts but not the rest")
    source = load_tokenizer(tokenizer_json)
    known = set(known_divergences)
    matched = 0
    unexpected: list[TokenizerMismatch] = []
    expected_known: list[TokenizerMismatch] = []
    for text, actual in zip(corpus, actual_all, strict=True):
        expected = [int(t) for t in source.encode(text, add_special_tokens=True).ids]
        got = _token_list(actual, who="target", target=target, method="tokenize")
        if got == expected:
            matched += 1
            continue
        mismatch = TokenizerMismatch(
            text=text, expected_ids=tuple(expected), actual_ids=tuple(got), known=text in known
        )
        (expected_known if mismatch.known else unexpected).append(mismatch)
    return TokenizerResult(
        status="checked",
        total=len(corpus),
        matched=matched,
        known_divergent=len(expected_known),
        mismatched=len(unexpected),
        examples=tuple([*unexpected, *expected_known][:MAX_MISMATCH_EXAMPLES]),
    )


# ------------------------------------------------------------------------------------------------ judging


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _warn_limit(bound: Bound, limit: float, factor: float) -> float:
    """Where the warn band ends (see Thresholds): factor x limit above, or the shortfall rule below."""
    if bound == "max":
        return limit * factor
    return limit if limit >= 1.0 else max(1.0 - factor * (1.0 - limit), limit / factor)


def _judge_metric(
    metric: str, bound: Bound, value: float | None, limit: float, factor: float, worst: str | None, skipped: str
) -> Check:
    """Pass, warn or fail one aggregate metric; the detail says which threshold it crossed and where."""
    warn = _warn_limit(bound, limit, factor)
    if value is None:
        return Check(
            metric=metric,
            bound=bound,
            value=None,
            limit=limit,
            warn_limit=_round(warn),
            verdict="skipped",
            detail=skipped,
        )
    inside, within_warn = (value <= limit, value <= warn) if bound == "max" else (value >= limit, value >= warn)
    verdict: Verdict = "pass" if inside else "warn" if within_warn else "fail"
    detail = None
    if verdict != "pass":
        side = "above" if bound == "max" else "below"
        if warn == limit:
            band = "(no warn band)"
        elif verdict == "warn":
            band = f"but within the warn band to {_fmt(warn)}"
        else:
            band = f"and beyond the warn band to {_fmt(warn)}"
        where = f" (worst: {worst})" if worst else ""
        detail = f"{metric} = {_fmt(value)} is {side} the limit {_fmt(limit)} {band}{where}"
    return Check(
        metric=metric,
        bound=bound,
        value=value,
        limit=limit,
        warn_limit=_round(warn),
        verdict=verdict,
        detail=detail,
    )


def _prompt_name(p: PromptMetrics) -> str:
    return f"prompt {p.index} ({p.label})" if p.label else f"prompt {p.index}"


def _worst(prompts: Sequence[PromptMetrics], key: Any, *, highest: bool) -> str | None:
    scored = [(key(p), p) for p in prompts if key(p) is not None]
    if not scored:
        return None
    pick = max if highest else min
    return _prompt_name(pick(scored, key=lambda s: s[0])[1])


def _judge(
    thresholds: Thresholds,
    metrics: AggregateMetrics,
    prompts: Sequence[PromptMetrics],
    tokenizer: TokenizerResult,
) -> list[Check]:
    t = thresholds
    f = t.warn_factor
    checks: list[Check] = []
    bad = [_prompt_name(p) for p in prompts if p.nonfinite_positions]
    checks.append(
        Check(
            metric="nonfinite_logits",
            bound="max",
            value=float(metrics.nonfinite_positions),
            limit=0.0,
            warn_limit=0.0,
            verdict="fail" if bad else "pass",
            detail=f"target logits contain NaN/Inf at {metrics.nonfinite_positions} positions ({', '.join(bad)})"
            if bad
            else None,
        )
    )
    no_logits = "no finite target logits to measure"
    upper = (
        ("max_abs_error", t.max_abs, metrics.max_abs_error),
        ("max_rel_error", t.max_rel, metrics.max_rel_error),
        ("mean_kl", t.mean_kl, metrics.mean_kl),
    )
    for metric, limit, value in upper:
        if limit is not None:
            worst = _worst(prompts, lambda p, m=metric: getattr(p, m), highest=True)
            checks.append(_judge_metric(metric, "max", value, limit, f, worst, no_logits))
    if t.min_top1 is not None:
        worst = _worst(prompts, lambda p: p.top1_agreement, highest=False)
        skipped = f"no position where the reference's top-1 margin reaches clear_margin {_fmt(t.clear_margin)}"
        checks.append(_judge_metric("top1_agreement", "min", metrics.top1_agreement, t.min_top1, f, worst, skipped))
    if t.min_greedy is not None:
        worst = _worst(prompts, lambda p: p.greedy.agreement if p.greedy else None, highest=False)
        skipped = "greedy decoding was not compared (max_new_tokens = 0)"
        checks.append(
            _judge_metric("greedy_agreement", "min", metrics.greedy_agreement, t.min_greedy, f, worst, skipped)
        )
    checks.append(_tokenizer_check(t, tokenizer))
    return checks


def _tokenizer_check(t: Thresholds, tokenizer: TokenizerResult) -> Check:
    warn_limit = 0.0 if t.tokenizer_exact else None
    if tokenizer.status != "checked":
        return Check(
            metric="tokenizer_mismatches",
            bound="max",
            value=None,
            limit=0.0,
            warn_limit=warn_limit,
            verdict="skipped",
            detail=tokenizer.skipped_reason,
        )
    n = tokenizer.mismatched
    detail = None
    verdict: Verdict = "pass"
    if n:
        verdict = "fail" if t.tokenizer_exact else "warn"
        first = next(e for e in tokenizer.examples if not e.known)
        detail = (
            f"tokenizer_mismatches = {n}: {n} of {tokenizer.total} corpus texts encode differently from "
            f"the source tokenizer (e.g. {first.text[:40]!r})"
        )
    return Check(
        metric="tokenizer_mismatches",
        bound="max",
        value=float(n),
        limit=0.0,
        warn_limit=warn_limit,
        verdict=verdict,
        detail=detail,
    )


# ------------------------------------------------------------------------------------------- entry point


def check_parity(
    reference: ForwardPass,
    runner: ForwardPass,
    *,
    target: str,
    precision: str,
    prompts: Sequence[Sequence[int]],
    tokenizer_json: Path | None = None,
    thresholds: Thresholds | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    known_tokenizer_divergences: Sequence[str] = (),
    prompt_labels: Sequence[str] | None = None,
    stop_ids: Sequence[int] = (),
    tokenizer_corpus: Sequence[str] = TOKENIZER_CORPUS,
) -> ParityReport:
    """Compare ``runner`` with ``reference`` on ``prompts`` (token ids) and judge it by ``thresholds``.

    ``thresholds`` defaults to :func:`thresholds_for` ``(precision)``. ``runner`` is a :class:`Runner`; its
    ``tokenize`` is optional. ``known_tokenizer_divergences`` lists corpus texts this target is known to
    encode differently (reported, not judged).
    """
    if not prompts:
        raise UsageError("parity needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise UsageError("parity prompts must not be empty token sequences")
    if prompt_labels is not None and len(prompt_labels) != len(prompts):
        raise UsageError(f"{len(prompt_labels)} prompt labels for {len(prompts)} prompts")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    stray = sorted(set(known_tokenizer_divergences) - set(tokenizer_corpus))
    if stray:
        raise UsageError(f"known tokenizer divergences not in the tokenizer corpus: {stray!r}")
    used = thresholds if thresholds is not None else thresholds_for(precision)

    per_prompt: list[PromptMetrics] = []
    pooled: list[_Pooled] = []
    for i, ids in enumerate(prompts):
        metrics, raw = _prompt_metrics(
            reference,
            runner,
            target=target,
            index=i,
            label=prompt_labels[i] if prompt_labels is not None else None,
            ids=[int(t) for t in ids],
            thresholds=used,
            max_new_tokens=max_new_tokens,
            stop_ids=[int(s) for s in stop_ids],
        )
        per_prompt.append(metrics)
        pooled.append(raw)
    aggregate = _aggregate(per_prompt, pooled)
    tokenizer = _check_tokenizer(runner, tokenizer_json, tokenizer_corpus, known_tokenizer_divergences, target=target)
    checks = _judge(used, aggregate, per_prompt, tokenizer)
    verdicts = {c.verdict for c in checks}
    status: Status = "FAILED" if "fail" in verdicts else "WARNED" if "warn" in verdicts else "PASSED"
    reasons = tuple(f"{c.verdict.upper()}: {c.detail}" for c in checks if c.verdict in ("fail", "warn") and c.detail)
    return ParityReport(
        target=target,
        precision=precision.strip().lower(),
        status=status,
        reasons=reasons,
        thresholds=used,
        checks=tuple(checks),
        metrics=aggregate,
        prompts=tuple(per_prompt),
        tokenizer=tokenizer,
        max_new_tokens=max_new_tokens,
        stop_ids=tuple(int(s) for s in stop_ids),
        runtime={
            "target": {str(k): str(v) for k, v in runner.runtime_info().items()},
            "reference": {str(k): str(v) for k, v in reference.runtime_info().items()},
        },
    )
