"""Measuring a runner against the reference: per-position logit statistics, greedy runs, tokenizer agreement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sovpack._protocols import EmbeddingRunner, PromptRun, Runner
from sovpack.errors import ParityError
from sovpack.parity.report import (
    AggregateMetrics,
    GreedyResult,
    PromptMetrics,
    TokenizerMismatch,
    TokenizerResult,
    round_metric,
)
from sovpack.parity.thresholds import Thresholds
from sovpack.source.tokenizer import load_tokenizer

MAX_MISMATCH_EXAMPLES = 5
_ROW_CHUNK = 16  # logit rows compared at once: bounds float64 temporaries for large vocabularies


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
            f"{target}: {who} prefill logits for prompt {index} have shape {list(array.shape)} "
            f"({array.dtype}); expected a float array of shape [{steps}, vocab]"
        )
    return array


def _greedy_result(
    reference: Runner,
    ids: Sequence[int],
    ref_tokens: list[int],
    tgt_tokens: list[int],
    clear_margin: float,
    router_tied: np.ndarray | None = None,
) -> GreedyResult:
    """Compare two continuations; at the first divergence ask the reference how close the call was.

    ``router_tied``: per logits row of the reference (prompt rows, then its greedy path's), whether its router
    had a near-tie there; a divergence at such a row is excused like a near-tie of the logits.
    """
    matched = 0
    for a, b in zip(ref_tokens, tgt_tokens, strict=False):
        if a != b:
            break
        matched += 1
    identical = ref_tokens == tgt_tokens
    margin: float | None = None
    near_tie = False
    # Row len(ids) - 1 + j of the reference chose its token j.
    chosen_by = router_tied[len(ids) - 1 : len(ids) - 1 + len(ref_tokens)] if router_tied is not None else None
    router_tie = None if chosen_by is None else False
    if not identical and matched < min(len(ref_tokens), len(tgt_tokens)):
        logits = np.asarray(reference.prefill_logits([*ids, *ref_tokens[:matched]]))[-1]
        alt = tgt_tokens[matched]
        if 0 <= alt < logits.shape[0]:
            margin = float(logits[ref_tokens[matched]]) - float(logits[alt])
            near_tie = margin < clear_margin
        if chosen_by is not None:
            router_tie = bool(chosen_by[matched]) if matched < chosen_by.size else False
    longer = max(len(ref_tokens), len(tgt_tokens))
    agreement = 1.0 if identical or near_tie or router_tie or longer == 0 else matched / longer
    return GreedyResult(
        reference_ids=tuple(ref_tokens),
        target_ids=tuple(tgt_tokens),
        matched_prefix=matched,
        identical=identical,
        divergence_margin=round_metric(margin),
        near_tie=near_tie,
        agreement=round_metric(agreement) or 0.0,
        router_near_tie=router_tie,
        router_near_tie_steps=None if chosen_by is None else int(chosen_by.sum()),
    )


def _token_list(value: Any, *, who: str, target: str, method: str) -> list[int]:
    try:
        return [int(t) for t in value]
    except (TypeError, ValueError) as e:
        raise ParityError(f"{target}: {who} {method} did not return a list of token ids: {e}") from e


def prompt_metrics(
    reference: Runner,
    reference_run: PromptRun,
    target_run: PromptRun,
    *,
    target: str,
    index: int,
    label: str | None,
    ids: list[int],
    thresholds: Thresholds,
    max_new_tokens: int,
    router_gaps: np.ndarray | None = None,
    router_margin: float = 0.0,
) -> tuple[PromptMetrics, Pooled]:
    """Metrics of one prompt, plus what the aggregate pools: per-position KL and top-1 agreement counts.

    ``reference_run`` and ``target_run``: the prompt's prefill logits and greedy continuation on each side;
    ``reference`` is asked again only where the continuations diverge (how close the call was).
    ``router_gaps``: the reference's recorded router gap of each of its logits rows (mixture of experts); a
    row whose gap is below ``router_margin`` is a router near-tie, excluded from top-1 judging and excusing a
    greedy divergence there, as a near-tie of the logits is.
    """
    steps = len(ids)
    ref = _as_logits(reference_run.logits, who="reference", target=target, index=index, steps=steps)
    tgt = _as_logits(target_run.logits, who="target", target=target, index=index, steps=steps)
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
    agree = stats.ref_top1 == stats.tgt_top1
    tied = None if router_gaps is None else np.asarray(router_gaps, dtype=np.float64) < router_margin
    if tied is not None:
        if tied.size < steps:
            raise ParityError(f"{target}: the reference has {tied.size} router gaps for prompt {index}'s {steps} rows")
        clear &= ~tied[:steps]
    n_clear = int(clear.sum())

    greedy = None
    if max_new_tokens > 0:
        ref_tokens = _token_list(reference_run.tokens, who="reference", target=target, method="greedy")
        tgt_tokens = _token_list(target_run.tokens, who="target", target=target, method="greedy")
        greedy = _greedy_result(reference, ids, ref_tokens, tgt_tokens, thresholds.clear_margin, tied)

    def stat(values: np.ndarray, reduce: Any) -> float | None:
        return round_metric(float(reduce(values[ok]))) if n_ok else None

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
        top1_agreement=round_metric(float(agree[clear].mean())) if n_clear else None,
        top1_agreement_all=round_metric(float(agree[ok].mean())) if n_ok else None,
        greedy=greedy,
        router_near_ties=None if tied is None else int(tied[:steps].sum()),
        router_tie_flips=None if tied is None else int((tied[:steps] & ok & ~agree).sum()),
    )
    pooled = Pooled(kl=stats.kl[ok], clear_agree=int(agree[clear].sum()), all_agree=int(agree[ok].sum()))
    return metrics, pooled


@dataclass(frozen=True, kw_only=True, slots=True)
class Pooled:
    """Raw per-prompt quantities the aggregate pools exactly (internal)."""

    kl: np.ndarray  # per finite position
    clear_agree: int
    all_agree: int


def aggregate_metrics(
    prompts: Sequence[PromptMetrics], pooled: Sequence[Pooled], router_margin: float | None = None
) -> AggregateMetrics:
    """Pool the prompts' metrics; ``router_margin`` is given (and the router counts summed) for MoE models."""

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
        mean_kl=round_metric(float(pooled_kl.mean())) if pooled_kl.size else None,
        max_kl=worst("max_kl"),
        clear_positions=clear,
        top1_agreement=round_metric(clear_agree / clear) if clear else None,
        top1_agreement_all=round_metric(all_agree / finite) if finite else None,
        greedy_agreement=round_metric(sum(g.agreement for g in greedy) / len(greedy)) if greedy else None,
        greedy_identical=sum(g.identical for g in greedy),
        greedy_near_ties=sum(g.near_tie for g in greedy),
        router_margin=round_metric(router_margin),
        router_near_ties=None if router_margin is None else sum(p.router_near_ties or 0 for p in prompts),
        router_tie_flips=None if router_margin is None else sum(p.router_tie_flips or 0 for p in prompts),
        greedy_router_ties=None if router_margin is None else sum(bool(g.router_near_tie) for g in greedy),
    )




def check_tokenizer(
    runner: Runner | EmbeddingRunner,
    tokenizer_json: Path | None,
    corpus: Sequence[str],
    known_divergences: Sequence[str],
    *,
    target: str,
    max_length: int | None = None,
) -> TokenizerResult:
    """The runner's tokenizer against the source's on ``corpus``; ``max_length``: the source truncates there
    (an embedding encoder's max_seq_length, special tokens included)."""
    if tokenizer_json is None:
        return TokenizerResult(status="skipped", skipped_reason="no source tokenizer.json to compare with")
    actual_all = [runner.tokenize(text) for text in corpus]
    missing = sum(a is None for a in actual_all)
    if missing == len(corpus):
        return TokenizerResult(status="skipped", skipped_reason="the target carries no tokenizer")
    if missing:
        raise ParityError(f"{target}: tokenize returned None for {missing} of {len(corpus)} texts but not the rest")
    source = load_tokenizer(tokenizer_json)
    if max_length is not None:
        source.enable_truncation(max_length)
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
