"""Real SmolLM2-135M-Instruct weights on llama.cpp: its published tokenizer (Digits + ByteLevel, llama.cpp's
"smollm") converts, and the f16 artifact passes parity at the default thresholds against the numpy reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovpack.artifact import ArtifactMetadata
from sovpack.convert import convert

pytest.importorskip("llama_cpp")


def test_smollm2_converts_with_its_own_tokenizer_and_passes_parity(smollm2: Path, tmp_path: Path) -> None:
    result = convert(smollm2, "gguf:f16", tmp_path / "out")
    report = result.parity
    assert report is not None and report.status == "PASSED", report and report.reasons
    assert report.tokenizer.status == "checked" and report.tokenizer.mismatched == 0
    assert report.metrics.greedy_agreement == 1.0
    tokenizer = ArtifactMetadata.load(tmp_path / "out").format_metadata["tokenizer"]
    assert tokenizer["pre"] == "smollm"
