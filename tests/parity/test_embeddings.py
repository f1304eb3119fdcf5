"""Embedding-encoder parity: recorded once from the numpy reference, judged per text on a real runtime.

The encoders' parity report has the decoders' shape (status, checks, thresholds, tokenizer) with an
``embeddings`` section instead of logits; it survives the schema, and the CLI refuses what encoders cannot do
(text generation) by name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sovpack.convert import convert
from sovpack.errors import ParityError
from sovpack.parity.embeddings import ENCODER_TOKENIZER_CORPUS, LABELED_TEXTS, record_embeddings
from sovpack.parity.report import PARITY_FILE, ParityReport
from sovpack.source.model import open_model
from sovpack.targets.base import TargetRef

pytest.importorskip("onnxruntime")


def test_recorded_reference_truncates_like_sentence_transformers(encoder_checkpoints: dict[str, Path]) -> None:
    recorded = record_embeddings(open_model(encoder_checkpoints["bert"]))
    assert recorded.labels == tuple(LABELED_TEXTS) and recorded.max_length == 48
    by_label = dict(zip(recorded.labels, recorded.truncated, strict=True))
    assert by_label["long"] and not by_label["food"]  # the fixture's 48-token cap cuts only the long text
    assert all(len(ids) <= 48 for ids in recorded.ids)
    norms = np.linalg.norm(recorded.embeddings, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # the fixture's pipeline normalises
    assert set(LABELED_TEXTS.values()) <= set(ENCODER_TOKENIZER_CORPUS)


@pytest.mark.parametrize("variant", ["bert", "xlmr"])
def test_convert_judges_an_encoder_by_its_embeddings(encoder_checkpoints: dict[str, Path], tmp_path: Path,
                                                     variant: str) -> None:
    result = convert(encoder_checkpoints[variant], "onnx:fp32", tmp_path / "out")
    report = result.parity
    assert report is not None and report.status == "PASSED", report and report.reasons
    e = report.embeddings
    assert e is not None and len(e.texts) == len(LABELED_TEXTS) and e.min_cosine > 0.99999
    assert e.max_hidden_abs is not None and e.max_hidden_abs < 1e-4
    assert report.prompts == () and report.metrics.prompts == 0
    assert {c.metric for c in report.checks} == {"min_cosine", "pipeline_min_cosine", "max_hidden_abs",
                                                "tokenizer_mismatches"}
    assert report.thresholds == TargetRef.parse("onnx:fp32").thresholds(encoder=True)
    long_text = next(t for t in e.texts if t.label == "long")
    assert long_text.truncated and long_text.pipeline_cosine is None  # cut texts are judged on ids only
    saved = ParityReport.load(tmp_path / "out" / PARITY_FILE)
    assert saved.to_dict() == report.to_dict() and "embeddings: 10 texts" in saved.notes[0]


def test_a_limit_the_artifact_misses_fails_and_writes_nothing(encoder_checkpoints: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """fp16 weights cost ~2e-7 of cosine: demanding 1 - 1e-9 fails, names the metric, leaves nothing behind."""
    with pytest.raises(ParityError, match=r"min_cosine = .* is below the limit"):
        convert(encoder_checkpoints["bert"], "onnx:fp16", tmp_path / "out",
                threshold_overrides={"min_cosine": 1 - 1e-9, "warn_factor": 1.0})
    assert not (tmp_path / "out").exists()


def test_decoder_thresholds_do_not_judge_embeddings() -> None:
    decoder, encoder = TargetRef.parse("gguf:q8_0").thresholds(), TargetRef.parse("gguf:q8_0").thresholds(encoder=True)
    assert decoder.min_cosine is None and decoder.max_hidden_abs is None
    assert encoder.min_cosine == 0.99 and encoder.mean_kl is None and encoder.min_top1 is None


def _sovpack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sovpack", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_prompt_run_on_an_encoder_is_refused_by_name(encoder_checkpoints: dict[str, Path]) -> None:
    """Encoders embed texts and generate none; bundles of encoders: tests/bundle/test_encoder_bundle.py."""
    ran = _sovpack("run", str(encoder_checkpoints["bert"]), "--prompt", "hello")
    assert ran.returncode in (1, 2) and "embedding encoder" in ran.stderr
    assert "Traceback" not in ran.stderr
