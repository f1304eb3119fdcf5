"""The parity harness, checked against the real numpy reference on tiny fixture checkpoints.

Runners here are the reference itself, the reference over perturbed weights (fp16/bf16 rounding, another
seed), or thin wrappers that add a tokenizer or damage one output on purpose: the harness is what is under
test, and every number it judges comes from a real forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer

from fixtures.generate import make_checkpoint
from sovpack._protocols import PromptRun, run_each
from sovpack.errors import ParityError, SourceError, UsageError
from sovpack.parity import (
    DEFAULT_THRESHOLDS,
    ParityReport,
    Thresholds,
    check_parity,
    parse_threshold_overrides,
    thresholds_for,
    validate_report,
)
from sovpack.parity.prompts import PROMPT_LABELS, PROMPTS, TOKENIZER_CORPUS, encode_prompts
from sovpack.reference import ReferenceModel
from sovpack.source.model import SourceModel, open_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "schemas" / "examples" / "parity-report.example.json"


class TokenizingRunner:
    """The reference plus a tokenizer, as an artifact that ships one would look."""

    def __init__(self, inner: ReferenceModel, tokenizer_json: Path, *, drop_bos_on_tabs: bool = False) -> None:
        self.inner = inner
        self.name = "tokenizing-reference"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.drop_bos_on_tabs = drop_bos_on_tabs

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.inner.prefill_logits(ids)

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        return self.inner.greedy(ids, max_new_tokens, stop_ids)

    def run_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
                    ) -> list[PromptRun]:
        return self.inner.run_prompts(prompts, max_new_tokens, stop_ids)

    def tokenize(self, text: str) -> list[int] | None:
        ids = list(self.tokenizer.encode(text, add_special_tokens=True).ids)
        if self.drop_bos_on_tabs and "\t" in text:
            return ids[1:]  # a converter bug that only shows on some inputs
        return ids

    def runtime_info(self) -> dict[str, str]:
        return {**self.inner.runtime_info(), "tokenizer": "tokenizers"}


class NoTokenizerRunner(TokenizingRunner):
    """Has a tokenize method that says the artifact carries no tokenizer."""

    def tokenize(self, text: str) -> list[int] | None:
        return None


class DamagedLogitsRunner:
    """The reference, but prefill logits are altered by ``damage`` (greedy untouched)."""

    def __init__(self, inner: ReferenceModel, damage) -> None:
        self.inner = inner
        self.name = "damaged-reference"
        self.damage = damage

    def prefill_logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.damage(self.inner.prefill_logits(ids).copy())

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        return self.inner.greedy(ids, max_new_tokens, stop_ids)

    def run_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
                    ) -> list[PromptRun]:
        runs = self.inner.run_prompts(prompts, max_new_tokens, stop_ids)
        return [PromptRun(logits=self.damage(run.logits.copy()), tokens=run.tokens) for run in runs]

    def runtime_info(self) -> dict[str, str]:
        return self.inner.runtime_info()


class SwappedGreedyRunner(DamagedLogitsRunner):
    """The reference, but greedy decoding picks the runner-up token at step ``step`` (then continues)."""

    def __init__(self, inner: ReferenceModel, step: int) -> None:
        super().__init__(inner, lambda x: x)
        self.step = step

    def greedy(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        head = self.inner.greedy(ids, self.step, stop_ids)
        logits = self.inner.prefill_logits([*ids, *head])[-1]
        swapped = int(np.argsort(logits)[-2])
        rest = self.inner.greedy([*ids, *head, swapped], max_new_tokens - self.step - 1, stop_ids)
        return [*head, swapped, *rest]

    def run_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
                    ) -> list[PromptRun]:
        return run_each(self, prompts, max_new_tokens, stop_ids)  # prompt by prompt, through the swapped greedy


@pytest.fixture(scope="module")
def model(checkpoints: dict[str, Path]) -> SourceModel:
    return open_model(checkpoints["llama3"])


@pytest.fixture(scope="module")
def reference(model: SourceModel) -> ReferenceModel:
    return ReferenceModel(model)


@pytest.fixture(scope="module")
def prompts(model: SourceModel) -> list[list[int]]:
    assert model.checkpoint.tokenizer_json is not None
    return encode_prompts(model.checkpoint.tokenizer_json)


@pytest.fixture(scope="module")
def fp16_report(model: SourceModel, reference: ReferenceModel, prompts: list[list[int]]) -> ParityReport:
    runner = TokenizingRunner(ReferenceModel(model, weight_dtype=np.float16), model.checkpoint.tokenizer_json)
    return check_parity(
        reference,
        runner,
        target="test:fp16",
        precision="fp16",
        prompts=prompts,
        tokenizer_json=model.checkpoint.tokenizer_json,
        prompt_labels=PROMPT_LABELS,
    )


def check(reference, runner, prompts, precision="fp32", **kwargs) -> ParityReport:
    return check_parity(reference, runner, target=f"test:{precision}", precision=precision, prompts=prompts, **kwargs)


def verdicts(report: ParityReport) -> dict[str, str]:
    return {c.metric: c.verdict for c in report.checks}


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_set_is_multilingual_and_corpus_covers_hard_cases() -> None:
    assert len(PROMPTS) == len(PROMPT_LABELS) == 8
    assert {"english", "french", "german", "chinese", "russian", "arabic", "code", "numbers"} == set(PROMPT_LABELS)
    corpus = "".join(TOKENIZER_CORPUS)
    for needle in ("\t", "\n\n", "   ", "<|im_start|>", "<s>", "😀", "你好", "Привет", "0123456789"):
        assert needle in corpus


def test_encode_prompts_adds_bos_and_caps_length(model: SourceModel) -> None:
    tok = model.checkpoint.tokenizer_json
    encoded = encode_prompts(tok)
    assert len(encoded) == len(PROMPTS)
    assert all(1 < len(ids) <= 48 for ids in encoded)
    assert all(ids[0] == model.spec.bos_token_id for ids in encoded)
    short = encode_prompts(tok, ["one two three four five six seven"], max_tokens=4)
    assert short == [encode_prompts(tok, ["one two three four five six seven"])[0][:4]]


def test_encode_prompts_errors(model: SourceModel, tmp_path: Path) -> None:
    tok = model.checkpoint.tokenizer_json
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        encode_prompts(tok, ["fine", ""])
    with pytest.raises(UsageError, match="no prompts"):
        encode_prompts(tok, [])
    with pytest.raises(SourceError, match="not found"):  # a missing or broken input file is a SourceError
        encode_prompts(tmp_path / "missing.json", ["x"])
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(SourceError, match="cannot load tokenizer"):
        encode_prompts(bad, ["x"])


# ----------------------------------------------------------------------------------------------- logits


def test_reference_against_itself_is_exact(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    report = check(reference, reference, prompts)
    assert report.status == "PASSED"
    assert report.reasons == ()
    m = report.metrics
    assert m.max_abs_error == 0.0 and m.max_rel_error == 0.0
    assert m.mean_kl == 0.0 and m.max_kl == 0.0
    assert m.top1_agreement == 1.0 and m.clear_positions > 0
    assert m.greedy_agreement == 1.0 and m.greedy_identical == len(prompts)
    assert m.positions == sum(len(p) for p in prompts)
    assert all(p.greedy is not None and p.greedy.identical and len(p.greedy.reference_ids) == 8 for p in report.prompts)
    assert report.tokenizer.status == "skipped"
    assert report.runtime["reference"]["runtime"] == "numpy-reference"


def test_fp16_weights_pass_fp16_and_fail_fp32(
    model: SourceModel, reference: ReferenceModel, prompts: list[list[int]], fp16_report: ParityReport
) -> None:
    m = fp16_report.metrics
    assert fp16_report.status == "PASSED", fp16_report.reasons
    # fp16 rounding moves logits by a little, never by nothing and never by much
    assert 1e-4 < m.max_abs_error < 0.25
    assert 1e-6 < m.max_rel_error < 2e-2
    assert 0 < m.mean_kl < 1e-3
    assert m.top1_agreement == 1.0
    assert fp16_report.runtime["target"]["weight_dtype"] == "float16"
    assert [p.label for p in fp16_report.prompts] == PROMPT_LABELS

    strict = check(reference, ReferenceModel(model, weight_dtype=np.float16), prompts, precision="fp32")
    for name in ("max_abs_error", "max_rel_error", "mean_kl", "max_kl", "greedy_agreement"):
        assert getattr(strict.metrics, name) == getattr(m, name)  # same numbers, judged by tighter limits ...
    assert strict.status == "FAILED"  # ... which fp16 rounding exceeds by more than the warn band
    assert verdicts(strict)["max_abs_error"] == "fail"
    assert any(r.startswith("FAIL: max_abs_error = ") and "limit 0.001" in r for r in strict.reasons)


def test_bf16_weights_pass_bf16_with_larger_errors_than_fp16(
    model: SourceModel, reference: ReferenceModel, prompts: list[list[int]], fp16_report: ParityReport
) -> None:
    report = check(reference, ReferenceModel(model, weight_dtype=ml_dtypes.bfloat16), prompts, precision="bf16")
    assert report.status == "PASSED", report.reasons
    assert report.metrics.max_abs_error > fp16_report.metrics.max_abs_error
    assert report.metrics.mean_kl > fp16_report.metrics.mean_kl


def test_different_weights_fail_naming_the_metrics(
    reference: ReferenceModel, prompts: list[list[int]], tmp_path: Path
) -> None:
    other = ReferenceModel(open_model(make_checkpoint("llama3", tmp_path / "other", seed=1234)))
    for precision in ("fp32", "fp16", "q4_0"):
        report = check(reference, other, prompts, precision=precision)
        assert report.status == "FAILED"
        failed = {c.metric for c in report.checks if c.verdict == "fail"}
        assert {"max_rel_error", "mean_kl", "top1_agreement"} <= failed
        assert report.metrics.max_rel_error > 1.0 and report.metrics.mean_kl > 1.0
        assert report.metrics.top1_agreement < 0.5
        for metric in failed:
            assert any(r.startswith(f"FAIL: {metric} = ") for r in report.reasons)
        with pytest.raises(ParityError, match="mean_kl"):
            report.raise_if_failed()


def test_nonfinite_target_logits_fail(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    def poison(logits: np.ndarray) -> np.ndarray:
        logits[1, 3] = np.nan
        return logits

    report = check(reference, DamagedLogitsRunner(reference, poison), prompts[:2])
    assert report.status == "FAILED"
    assert report.metrics.nonfinite_positions == 2
    assert report.metrics.max_abs_error == 0.0  # the finite rows still compare exactly
    assert verdicts(report)["nonfinite_logits"] == "fail"
    assert any("NaN/Inf at 2 positions" in r for r in report.reasons)
    validate_report(report.to_dict())


def test_wrong_vocabulary_is_a_parity_error(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    runner = DamagedLogitsRunner(reference, lambda x: x[:, :-1])
    with pytest.raises(ParityError, match="vocabulary size differs"):
        check(reference, runner, prompts[:1])


def test_greedy_divergence_at_a_near_tie_is_excused(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    runner = SwappedGreedyRunner(reference, step=3)
    forgiving = Thresholds(max_abs=1e-3, max_rel=1e-4, mean_kl=1e-6, min_top1=1.0, min_greedy=1.0, clear_margin=1e9)
    report = check(reference, runner, prompts[:2], thresholds=forgiving)
    greedy = report.prompts[0].greedy
    assert greedy is not None and greedy.matched_prefix == 3 and not greedy.identical
    assert greedy.near_tie and greedy.agreement == 1.0 and greedy.divergence_margin > 0
    assert report.metrics.greedy_near_ties == 2
    assert report.status == "PASSED"

    strict = check(
        reference, runner, prompts[:2], thresholds=Thresholds(**{**forgiving.to_dict(), "clear_margin": 0.0})
    )
    greedy = strict.prompts[0].greedy
    assert greedy is not None and not greedy.near_tie and greedy.agreement == pytest.approx(3 / 8)
    assert strict.metrics.greedy_agreement == pytest.approx(3 / 8)
    assert strict.status == "FAILED" and verdicts(strict)["greedy_agreement"] == "fail"


def test_zero_new_tokens_skips_greedy(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    report = check(reference, reference, prompts[:1], max_new_tokens=0)
    assert report.prompts[0].greedy is None and report.metrics.greedy_agreement is None
    assert verdicts(report)["greedy_agreement"] == "skipped"
    assert report.status == "PASSED"


def test_bad_arguments_are_usage_errors(reference: ReferenceModel, prompts: list[list[int]]) -> None:
    with pytest.raises(UsageError, match="at least one prompt"):
        check(reference, reference, [])
    with pytest.raises(UsageError, match="must not be empty"):
        check(reference, reference, [[]])
    with pytest.raises(UsageError, match="2 prompt labels for 1 prompts"):
        check(reference, reference, prompts[:1], prompt_labels=["a", "b"])
    with pytest.raises(UsageError, match="not in the tokenizer corpus"):
        check(reference, reference, prompts[:1], known_tokenizer_divergences=["no such text"])


# -------------------------------------------------------------------------------------------- tokenizer


def test_identical_tokenizer_agrees_fully(fp16_report: ParityReport) -> None:
    tok = fp16_report.tokenizer
    assert tok.status == "checked"
    assert tok.total == len(TOKENIZER_CORPUS) and tok.matched == tok.total
    assert tok.mismatched == 0 and tok.examples == () and tok.agreement == 1.0
    assert verdicts(fp16_report)["tokenizer_mismatches"] == "pass"


def test_different_tokenizer_reports_mismatch_examples(
    checkpoints: dict[str, Path], model: SourceModel, reference: ReferenceModel, prompts: list[list[int]]
) -> None:
    runner = TokenizingRunner(reference, checkpoints["llama2"] / "tokenizer.json")
    report = check(reference, runner, prompts[:1], tokenizer_json=model.checkpoint.tokenizer_json)
    tok = report.tokenizer
    assert tok.status == "checked" and tok.mismatched > len(TOKENIZER_CORPUS) // 2
    assert tok.matched + tok.mismatched == tok.total
    assert len(tok.examples) == 5
    source = Tokenizer.from_file(str(model.checkpoint.tokenizer_json))
    for example in tok.examples:
        assert example.text in TOKENIZER_CORPUS and not example.known
        assert list(example.expected_ids) == source.encode(example.text, add_special_tokens=True).ids
        assert list(example.actual_ids) == runner.tokenize(example.text)
        assert example.expected_ids != example.actual_ids
    assert report.status == "FAILED"
    assert any(r.startswith(f"FAIL: tokenizer_mismatches = {tok.mismatched}") for r in report.reasons)

    lenient = thresholds_for("fp32", {"tokenizer_exact": False})
    assert (
        check(reference, runner, prompts[:1], tokenizer_json=model.checkpoint.tokenizer_json, thresholds=lenient).status
        == "WARNED"
    )


def test_known_tokenizer_divergences_are_reported_not_judged(
    model: SourceModel, reference: ReferenceModel, prompts: list[list[int]]
) -> None:
    runner = TokenizingRunner(reference, model.checkpoint.tokenizer_json, drop_bos_on_tabs=True)
    tabbed = [t for t in TOKENIZER_CORPUS if "\t" in t]
    tok_json = model.checkpoint.tokenizer_json
    report = check(reference, runner, prompts[:1], tokenizer_json=tok_json)
    assert report.tokenizer.mismatched == len(tabbed) >= 2
    assert sorted(e.text for e in report.tokenizer.examples) == sorted(tabbed)
    assert report.status == "FAILED"

    excused = check(reference, runner, prompts[:1], tokenizer_json=tok_json, known_tokenizer_divergences=tabbed)
    assert excused.status == "PASSED"
    assert excused.tokenizer.known_divergent == len(tabbed) and excused.tokenizer.mismatched == 0
    assert all(e.known for e in excused.tokenizer.examples)


def test_runner_without_tokenizer_is_skipped(model: SourceModel, reference: ReferenceModel, prompts) -> None:
    runner = NoTokenizerRunner(reference, model.checkpoint.tokenizer_json)
    report = check(reference, runner, prompts[:1], tokenizer_json=model.checkpoint.tokenizer_json)
    assert report.tokenizer.status == "skipped" and "no tokenizer" in report.tokenizer.skipped_reason
    assert verdicts(report)["tokenizer_mismatches"] == "skipped"
    with_tok = TokenizingRunner(reference, model.checkpoint.tokenizer_json)
    no_source = check(reference, with_tok, prompts[:1])
    assert no_source.tokenizer.status == "skipped" and "tokenizer.json" in no_source.tokenizer.skipped_reason


# ------------------------------------------------------------------------------------------- thresholds


def test_threshold_table_orders_precisions_sensibly() -> None:
    fp32, fp16, bf16 = (thresholds_for(p) for p in ("fp32", "fp16", "bf16"))
    assert fp32.max_abs < fp16.max_abs < bf16.max_abs
    assert fp32.mean_kl < fp16.mean_kl < bf16.mean_kl
    assert thresholds_for("F16") is thresholds_for("fp16")
    kls = [thresholds_for(p).mean_kl for p in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")]
    assert kls == sorted(kls)
    for name in ("int8", "int4", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"):
        assert DEFAULT_THRESHOLDS[name].max_abs is None  # quantized: judged by distributions


def test_threshold_overrides(reference: ReferenceModel, model: SourceModel, prompts: list[list[int]]) -> None:
    t = thresholds_for("fp16", {"max_abs": 0.5, "min_greedy": None, "tokenizer_exact": False})
    assert t.max_abs == 0.5 and t.min_greedy is None and not t.tokenizer_exact
    assert t.mean_kl == DEFAULT_THRESHOLDS["fp16"].mean_kl
    # put the fp16 runner's max_abs_error inside the fp32 warn band: WARNED, naming the metric
    runner = ReferenceModel(model, weight_dtype=np.float16)
    measured = check(reference, runner, prompts[:2], precision="fp16").metrics.max_abs_error
    overrides = {"max_abs": measured / 1.5, "max_rel": None, "mean_kl": None}
    report = check(reference, runner, prompts[:2], thresholds=thresholds_for("fp32", overrides))
    assert report.status == "WARNED"
    assert len(report.reasons) == 1 and report.reasons[0].startswith("WARN: max_abs_error = ")
    assert "warn band" in report.reasons[0]
    assert report.thresholds.max_abs == pytest.approx(measured / 1.5)
    report.raise_if_failed()  # WARNED does not raise


def test_threshold_errors() -> None:
    with pytest.raises(UsageError, match=r"known precisions: .*fp16.*q4_k_m"):
        thresholds_for("fp8")
    with pytest.raises(UsageError, match=r"unknown threshold name.*max_abz"):
        thresholds_for("fp16", {"max_abz": 1.0})
    with pytest.raises(UsageError, match="must not be negative"):
        thresholds_for("fp16", {"max_abs": -1.0})
    with pytest.raises(UsageError, match="fraction"):
        thresholds_for("fp16", {"min_top1": 1.5})
    with pytest.raises(UsageError, match="warn_factor"):
        thresholds_for("fp16", {"warn_factor": 0.5})


def test_parse_threshold_overrides() -> None:
    parsed = parse_threshold_overrides(["max_abs=0.01", "mean_kl = none", "tokenizer_exact=false"])
    assert parsed == {"max_abs": 0.01, "mean_kl": None, "tokenizer_exact": False}
    assert thresholds_for("fp32", parsed).max_abs == 0.01
    for bad in ("max_abs", "max_abs=", "nope=1", "max_abs=lots", "tokenizer_exact=maybe"):
        with pytest.raises(UsageError):
            parse_threshold_overrides([bad])


# ----------------------------------------------------------------------------------------------- report


def test_report_round_trips_and_validates(fp16_report: ParityReport, tmp_path: Path) -> None:
    data = fp16_report.to_dict()
    validate_report(data)
    assert ParityReport.from_dict(data) == fp16_report
    assert ParityReport.from_dict(json.loads(fp16_report.to_json())) == fp16_report
    path = tmp_path / "out" / "parity.json"
    fp16_report.save(path)
    assert path.read_text(encoding="utf-8") == fp16_report.to_json()
    assert [p.name for p in path.parent.iterdir()] == ["parity.json"]  # no temporary left behind
    assert ParityReport.load(path) == fp16_report


def test_report_json_is_deterministic(model: SourceModel, prompts: list[list[int]]) -> None:
    def run() -> str:
        runner = TokenizingRunner(ReferenceModel(model, weight_dtype=np.float16), model.checkpoint.tokenizer_json)
        return check(
            ReferenceModel(model), runner, prompts, precision="fp16", tokenizer_json=model.checkpoint.tokenizer_json
        ).to_json()

    first, second = run(), run()
    assert first == second
    assert first.endswith("}\n") and first.count("\n") > 100
    data = json.loads(first)
    assert list(data) == sorted(data)
    assert "NaN" not in first and "Infinity" not in first


def test_failed_report_validates_and_reasons_match_status(reference: ReferenceModel, prompts, tmp_path) -> None:
    other = ReferenceModel(open_model(make_checkpoint("llama3", tmp_path / "other", seed=99)))
    report = check(reference, other, prompts[:2])
    validate_report(report.to_dict())
    assert ParityReport.from_dict(report.to_dict()) == report


def test_invalid_reports_are_rejected(fp16_report: ParityReport, tmp_path: Path) -> None:
    data = fp16_report.to_dict()
    with pytest.raises(ParityError, match="status"):
        validate_report({**data, "status": "MAYBE"})
    with pytest.raises(ParityError, match="reasons"):
        validate_report({**data, "status": "FAILED"})  # a FAILED report must say why
    broken = json.loads(json.dumps(data))
    del broken["metrics"]["mean_kl"]
    with pytest.raises(ParityError, match="mean_kl"):
        ParityReport.from_dict(broken)
    bad = tmp_path / "parity.json"
    bad.write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ParityError, match="malformed JSON"):
        ParityReport.load(bad)
    with pytest.raises(ParityError, match="cannot read"):
        ParityReport.load(tmp_path / "missing.json")


def test_committed_example_validates() -> None:
    data = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    validate_report(data)
    report = ParityReport.load(EXAMPLE)
    assert report.to_json() == EXAMPLE.read_text(encoding="utf-8")
    assert report.status in ("PASSED", "WARNED", "FAILED")
    assert len(report.prompts) == len(PROMPTS)
