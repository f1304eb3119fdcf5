"""Judging measured metrics by thresholds, and the harness entry point ``check_parity``.

Mixture of experts: where the reference's own router nearly chose other experts for a token (a router
near-tie, see :func:`sovpack.reference.router_gap`), a target may legitimately route it elsewhere, and then
its logits there can differ by far more than rounding. Such positions are counted in the report; a top-1 or
greedy mismatch at one is explained rather than failed (excluded from ``top1_agreement`` like a near-tie of the
logits, and a greedy divergence there counts as agreement). The logit metrics stay as measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sovpack._protocols import PromptRun, Runner
from sovpack.errors import ParityError, UsageError
from sovpack.parity.metrics import Pooled, aggregate_metrics, check_tokenizer, prompt_metrics
from sovpack.parity.prompts import DEFAULT_MAX_NEW_TOKENS, TOKENIZER_CORPUS
from sovpack.parity.recorded import RecordedReference
from sovpack.parity.report import (
    AggregateMetrics,
    Bound,
    Check,
    ParityReport,
    PromptMetrics,
    Status,
    TokenizerResult,
    Verdict,
    round_metric,
)
from sovpack.parity.thresholds import Thresholds, thresholds_for

# NOTE: a router near-tie is a router gap (relative, see sovpack.reference.router_gap) below this share of
# max_rel. Router logits are a readout of the same residual stream as the head, so a target's relative error
# there is of the kind max_rel bounds at the head, where it has built up over every layer and has headroom:
# on the MoE fixtures, q8_0-rounded weights move router logits by 1.1e-2 (median) and 5e-2 (99th percentile)
# of their scale, which q8_0's max_rel 0.2 x 0.25 covers. Deriving it from max_rel keeps it per precision,
# under the user's overrides and a policy's ceilings; no max_rel (not judged) means margin 0, no excuses.
ROUTER_MARGIN_SHARE = 0.25


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _warn_limit(bound: Bound, limit: float, factor: float) -> float:
    """Where the warn band ends (see Thresholds): factor x limit above, or the shortfall rule below."""
    if bound == "max":
        return limit * factor
    return limit if limit >= 1.0 else max(1.0 - factor * (1.0 - limit), limit / factor)


def judge_metric(
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
            warn_limit=round_metric(warn),
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
        warn_limit=round_metric(warn),
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
            checks.append(judge_metric(metric, "max", value, limit, f, worst, no_logits))
    if t.min_top1 is not None:
        worst = _worst(prompts, lambda p: p.top1_agreement, highest=False)
        skipped = f"no position where the reference's top-1 margin reaches clear_margin {_fmt(t.clear_margin)}"
        checks.append(judge_metric("top1_agreement", "min", metrics.top1_agreement, t.min_top1, f, worst, skipped))
    if t.min_greedy is not None:
        worst = _worst(prompts, lambda p: p.greedy.agreement if p.greedy else None, highest=False)
        skipped = "greedy decoding was not compared (max_new_tokens = 0)"
        checks.append(
            judge_metric("greedy_agreement", "min", metrics.greedy_agreement, t.min_greedy, f, worst, skipped)
        )
    checks.append(tokenizer_check(t, tokenizer))
    return checks


def tokenizer_check(t: Thresholds, tokenizer: TokenizerResult) -> Check:
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


def verdict(checks: Sequence[Check]) -> tuple[Status, tuple[str, ...]]:
    """The report's status (any fail: FAILED, else any warn: WARNED) and one reason line per warn or fail."""
    verdicts = {c.verdict for c in checks}
    status: Status = "FAILED" if "fail" in verdicts else "WARNED" if "warn" in verdicts else "PASSED"
    return status, tuple(f"{c.verdict.upper()}: {c.detail}" for c in checks
                         if c.verdict in ("fail", "warn") and c.detail)


def _runs(
    runner: Runner, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: list[int], *, who: str,
    target: str,
) -> list[PromptRun]:
    """All prompts through one side (batched where its runtime can), one run per prompt or ParityError."""
    runs = runner.run_prompts([[int(t) for t in ids] for ids in prompts], max_new_tokens, stop_ids)
    if len(runs) != len(prompts):
        raise ParityError(f"{target}: the {who} answered {len(runs)} of {len(prompts)} prompts")
    return list(runs)


def check_parity(
    reference: Runner,
    runner: Runner,
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
    # NOTE: router gaps come from the recorded reference (what convert, build and `sovpack parity` judge
    # against); a live ReferenceModel passed here is not asked, so its reports carry no router counts.
    gaps = [reference.router_gaps(ids) if isinstance(reference, RecordedReference) else None for ids in prompts]
    router_margin = (used.max_rel or 0.0) * ROUTER_MARGIN_SHARE if any(g is not None for g in gaps) else None

    stops = [int(s) for s in stop_ids]
    reference_runs = _runs(reference, prompts, max_new_tokens, stops, who="reference", target=target)
    target_runs = _runs(runner, prompts, max_new_tokens, stops, who="target", target=target)
    per_prompt: list[PromptMetrics] = []
    pooled: list[Pooled] = []
    for i, ids in enumerate(prompts):
        metrics, raw = prompt_metrics(
            reference,
            reference_runs[i],
            target_runs[i],
            target=target,
            index=i,
            label=prompt_labels[i] if prompt_labels is not None else None,
            ids=[int(t) for t in ids],
            thresholds=used,
            max_new_tokens=max_new_tokens,
            router_gaps=gaps[i],
            router_margin=router_margin or 0.0,
        )
        per_prompt.append(metrics)
        pooled.append(raw)
    aggregate = aggregate_metrics(per_prompt, pooled, router_margin)
    tokenizer = check_tokenizer(runner, tokenizer_json, tokenizer_corpus, known_tokenizer_divergences, target=target)
    checks = _judge(used, aggregate, per_prompt, tokenizer)
    status, reasons = verdict(checks)
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
