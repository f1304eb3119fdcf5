"""Router near-ties of mixture-of-experts models in the reference, the recorded reference and the parity report.

Every number comes from a real forward pass of the numpy reference on fixture checkpoints. The constructed case
gives the last sparse layer of a float32 qwen3moe fixture two experts with nearly equal router rows, and a
"target" whose router has those two rows swapped (a perturbation of 1e-5, as rounding would make): it routes
differently exactly where the reference's router sits at a near-tie between them, and nowhere else. Since the
layer is the last one, a flipped expert changes only its own position's logits, so every top-1 or greedy
mismatch happens at a recorded near-tie.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fixtures.generate import make_checkpoint
from sovpack.errors import VerificationError
from sovpack.parity import ParityReport, Thresholds, check_parity, thresholds_for, validate_report
from sovpack.parity.judge import ROUTER_MARGIN_SHARE
from sovpack.parity.recorded import RecordedReference, ReferenceConfig, record_reference
from sovpack.parity.report import ROUTER_AGGREGATE_FIELDS, ROUTER_GREEDY_FIELDS, ROUTER_PROMPT_FIELDS
from sovpack.reference import KVCache, ReferenceModel, router_gap
from sovpack.source.model import open_model
from sovpack.source.spec import MoESpec

ROUTER = "model.layers.2.mlp.gate.weight"  # the qwen3moe fixture's last layer is sparse (layer 1 is dense)
TWINS = (1, 2)  # experts given nearly equal router rows
# Strict everywhere but the logit metrics, which a flipped expert moves by far more than rounding.
STRICT = Thresholds(max_abs=None, max_rel=4e-3, mean_kl=None, min_top1=1.0, min_greedy=1.0, clear_margin=2e-3)


def _moe(k: int, experts: int, router_softmax: str = "before_topk") -> MoESpec:
    return MoESpec(
        num_experts=experts,
        experts_per_token=k,
        expert_intermediate_size=8,
        sparse_layers=(0,),
        router_softmax=router_softmax,  # type: ignore[arg-type]
        norm_topk_prob=True,
    )


def _check(reference: RecordedReference, runner: ReferenceModel, thresholds: Thresholds = STRICT) -> ParityReport:
    return check_parity(
        reference,
        runner,
        target="twins:fp32",
        precision="fp32",
        prompts=reference.prompt_ids,
        thresholds=thresholds,
        max_new_tokens=reference.config.max_new_tokens,
        prompt_labels=reference.prompt_labels,
        stop_ids=reference.config.stop_ids,
    )


def _without_gaps(reference: RecordedReference) -> RecordedReference:
    """The same recorded answers as a dense model's reference would carry them: no router gaps."""
    config = dataclasses.replace(
        reference.config,
        prompts=tuple(dataclasses.replace(p, router_gaps=None) for p in reference.config.prompts),
    )
    logits = {p.index: reference.prefill_logits([*p.ids, *p.greedy_ids[:-1]]) for p in config.prompts}
    return RecordedReference(config, logits, stored=False)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(reference checkpoint, target checkpoint): float32 qwen3moe whose last router has near-twin experts."""
    root = tmp_path_factory.mktemp("twins")
    source = make_checkpoint("qwen3moe", root / "reference", dtype="float32")
    tensors = load_file(source / "model.safetensors")
    router = tensors[ROUTER].copy()
    a, b = TWINS
    noise = np.random.default_rng(1).standard_normal(router.shape[1], dtype=np.float32)
    router[b] = router[a] + np.float32(1e-5) * noise
    save_file({**tensors, ROUTER: router}, str(source / "model.safetensors"), metadata={"format": "pt"})
    target = root / "target"
    shutil.copytree(source, target)
    swapped = router.copy()
    swapped[[a, b]] = router[[b, a]]
    save_file({**tensors, ROUTER: swapped}, str(target / "model.safetensors"), metadata={"format": "pt"})
    return source, target


@pytest.fixture(scope="module")
def twins_reference(twins: tuple[Path, Path]) -> RecordedReference:
    return record_reference(open_model(twins[0]))


@pytest.fixture(scope="module")
def twins_report(twins: tuple[Path, Path], twins_reference: RecordedReference) -> ParityReport:
    return _check(twins_reference, ReferenceModel(open_model(twins[1])))


def test_router_gap_measures_the_topk_boundary() -> None:
    logits = np.array([[3.0, 1.0, 0.997, -2.0], [-4.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    for kind in ("before_topk", "after_topk"):
        gaps = router_gap(logits, _moe(2, 4, kind))
        # k-th minus (k+1)-th largest logit over the token's largest |logit|, the same for both router kinds
        np.testing.assert_allclose(gaps, [0.003 / 3.0, 1.0 / 4.0], rtol=1e-5)
    np.testing.assert_allclose(router_gap(logits, _moe(1, 4)), [2.0 / 3.0, 1.0 / 4.0], rtol=1e-6)
    assert router_gap(logits, _moe(4, 4)).tolist() == [2.0, 2.0]  # every expert routed: nothing can flip
    assert router_gap(logits[:, None], _moe(2, 4)).shape == (2, 1)  # leading axes are kept


@pytest.mark.parametrize("variant", ["qwen3moe", "mixtral", "gptoss"])
def test_recorded_reference_keeps_each_rows_router_gap(checkpoints: dict[str, Path], variant: str) -> None:
    model = open_model(checkpoints[variant])
    recorded = record_reference(model, max_new_tokens=4)
    live = ReferenceModel(model)
    for prompt in recorded.config.prompts[:3]:
        assert prompt.router_gaps is not None and len(prompt.router_gaps) == prompt.rows
        # The rows of the batched greedy run are those of one unbatched pass over the prompt and its greedy path.
        live.forward([*prompt.ids, *prompt.greedy_ids[:-1]], KVCache())
        assert live.router_gaps is not None
        # (batched and unbatched matmuls round differently: gaps are differences of logits, so compare absolutely)
        np.testing.assert_allclose(prompt.router_gaps, live.router_gaps[0], atol=1e-5)
        gaps = recorded.router_gaps(prompt.ids)
        assert gaps is not None and gaps.tolist() == list(prompt.router_gaps)
    data = recorded.config.to_dict()
    assert ReferenceConfig.from_dict(json.loads(json.dumps(data))) == recorded.config  # schema-valid, lossless


def test_dense_models_have_no_router_fields(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["llama3"])
    recorded = record_reference(model, ["The quick brown fox"], max_new_tokens=3)
    assert recorded.router_gaps(recorded.prompt_ids[0]) is None
    assert "router_gaps" not in recorded.config.to_dict()["prompts"][0]  # dense configs are what they were
    report = _check(recorded, ReferenceModel(model))
    assert report.status == "PASSED" and report.notes == ()
    data = json.loads(report.to_json())
    assert not set(ROUTER_AGGREGATE_FIELDS) & set(data["metrics"])
    assert not set(ROUTER_PROMPT_FIELDS) & set(data["prompts"][0])
    assert not set(ROUTER_GREEDY_FIELDS) & set(data["prompts"][0]["greedy"])


def test_moe_reference_against_itself_counts_near_ties_and_passes(checkpoints: dict[str, Path]) -> None:
    model = open_model(checkpoints["qwen3moe"])
    recorded = record_reference(model)
    q8 = thresholds_for("q8_0")
    report = _check(recorded, ReferenceModel(model), q8)
    m = report.metrics
    assert report.status == "PASSED"
    assert q8.max_rel is not None and m.router_margin == pytest.approx(q8.max_rel * ROUTER_MARGIN_SHARE)
    gaps = [np.asarray(p.router_gaps)[: len(p.ids)] for p in recorded.config.prompts]
    expected = sum(int((g < m.router_margin).sum()) for g in gaps)
    assert m.router_near_ties == expected and expected > 0
    assert m.router_tie_flips == 0 and m.greedy_router_ties == 0
    assert m.clear_positions <= m.positions - expected


def test_flipped_expert_at_a_router_near_tie_is_explained(
    twins_reference: RecordedReference, twins_report: ParityReport
) -> None:
    m = twins_report.metrics
    assert m.router_margin == pytest.approx(STRICT.max_rel * ROUTER_MARGIN_SHARE)  # type: ignore[operator]
    assert m.router_near_ties is not None and 0 < m.router_near_ties < m.positions
    # The target really routes differently: its logits move, and top-1 flips at some near-tie positions.
    assert m.max_rel_error is not None and m.max_rel_error > 0.01
    assert m.router_tie_flips and m.top1_agreement_all is not None and m.top1_agreement_all < 1.0
    # ... and only there: judged top-1 and greedy are exact, the flips are reported as explained.
    assert m.top1_agreement == 1.0 and m.greedy_agreement == 1.0
    checks = {c.metric: c.verdict for c in twins_report.checks}
    assert checks["top1_agreement"] == "pass" and checks["greedy_agreement"] == "pass"
    assert checks["max_rel_error"] == "fail"  # logit metrics stay as measured
    assert sum(p.router_near_ties or 0 for p in twins_report.prompts) == m.router_near_ties
    assert sum(p.router_tie_flips or 0 for p in twins_report.prompts) == m.router_tie_flips
    parted = [p.greedy for p in twins_report.prompts if p.greedy is not None and not p.greedy.identical]
    assert all(g.router_near_tie for g in parted) and m.greedy_router_ties == len(parted)
    (note,) = twins_report.notes
    assert f"router near-ties: {m.router_near_ties} of {m.positions}" in note
    assert f"{m.router_tie_flips} top-1 flip(s)" in note


def test_without_router_gaps_the_same_flips_fail(
    twins: tuple[Path, Path], twins_reference: RecordedReference, twins_report: ParityReport
) -> None:
    report = _check(_without_gaps(twins_reference), ReferenceModel(open_model(twins[1])))
    checks = {c.metric: c.verdict for c in report.checks}
    assert checks["top1_agreement"] == "fail" and report.metrics.router_margin is None
    m, excused = report.metrics, twins_report.metrics
    assert m.top1_agreement is not None and m.top1_agreement < 1.0
    assert m.max_rel_error == excused.max_rel_error and m.top1_agreement_all == excused.top1_agreement_all


def test_router_margin_derives_from_max_rel(twins: tuple[Path, Path], twins_reference: RecordedReference) -> None:
    unjudged = _check(twins_reference, ReferenceModel(open_model(twins[1])), Thresholds(**{
        **STRICT.to_dict(), "max_rel": None
    }))
    m = unjudged.metrics
    assert m.router_margin == 0.0 and m.router_near_ties == 0 and m.router_tie_flips == 0  # no margin, no excuse
    assert {c.metric: c.verdict for c in unjudged.checks}["top1_agreement"] == "fail"


def test_moe_report_round_trips_and_validates(twins_report: ParityReport, tmp_path: Path) -> None:
    path = tmp_path / "parity.json"
    twins_report.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    validate_report(data)
    assert set(ROUTER_AGGREGATE_FIELDS) <= set(data["metrics"])
    assert set(ROUTER_PROMPT_FIELDS) <= set(data["prompts"][0])
    assert ParityReport.load(path) == twins_report
    broken = json.loads(json.dumps(data))
    del broken["metrics"]["router_near_ties"]  # a margin without its counts
    with pytest.raises(Exception, match="router_near_ties"):
        ParityReport.parse(broken, "broken.json")


def test_router_gaps_must_cover_every_row(twins_reference: RecordedReference) -> None:
    data = twins_reference.config.to_dict()
    data["prompts"][0]["router_gaps"] = data["prompts"][0]["router_gaps"][:-1]
    with pytest.raises(VerificationError, match="router gaps"):
        ReferenceConfig.from_dict(data)
    data["prompts"][0]["router_gaps"] = [-1.0] * data["prompts"][0]["rows"]
    with pytest.raises(VerificationError, match="invalid"):
        ReferenceConfig.from_dict(data)
