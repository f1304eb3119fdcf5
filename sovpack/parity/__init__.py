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
- router near-ties (mixture of experts only): prompt positions where the reference's own router had its k-th
  and (k+1)-th expert within ``router_margin`` (a quarter of ``max_rel``, relative to the router logits' scale).
  A target may route such a token elsewhere without any conversion error, so these positions are left out of
  ``top1_agreement`` and a greedy divergence at one is excused; the counts are reported, logit metrics are not
  adjusted. The recorded reference carries each row's router gap (see :mod:`sovpack.parity.recorded`).
- tokenizer agreement: if the runner carries a tokenizer, it must encode :data:`TOKENIZER_CORPUS` exactly as
  the source tokenizer.json does (known, documented divergences are reported but not judged).
"""

from sovpack.parity.judge import DEFAULT_MAX_NEW_TOKENS, check_parity
from sovpack.parity.report import (
    AggregateMetrics,
    Check,
    GreedyResult,
    ParityReport,
    PromptMetrics,
    TokenizerMismatch,
    TokenizerResult,
    validate_report,
)
from sovpack.parity.thresholds import (
    DEFAULT_THRESHOLDS,
    THRESHOLD_KEYS,
    Thresholds,
    parse_threshold_overrides,
    thresholds_for,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_THRESHOLDS",
    "THRESHOLD_KEYS",
    "AggregateMetrics",
    "Check",
    "GreedyResult",
    "ParityReport",
    "PromptMetrics",
    "Thresholds",
    "TokenizerMismatch",
    "TokenizerResult",
    "check_parity",
    "parse_threshold_overrides",
    "thresholds_for",
    "validate_report",
]
